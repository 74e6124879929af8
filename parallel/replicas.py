"""Links of a sessions server: the serving rank to each group's leader, and each leader to its
group (engine/serving/replicas.py and engine/serving/group.py say what travels on them).

A replica is a rank group (parallel/topology.py). Each group's leader (its first rank) gets a
two-rank gloo group with the serving rank, and each group of more than one rank gets a gloo group
of its own for the leader's round packets, all made once at start by every rank alike. Packets
are host memory (decoded frames, JSON), so gloo carries them on GPU jobs too, and a group per
link means a dead or silent group breaks only its own links: a receive from it fails when its
connection closes, or after the job's timeout when it says nothing.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from parallel.topology import Topology

SERVING_RANK = 0
GROUP_REPORT_S = 10.0
"""How much longer than the job's timeout the serving rank waits for a group's leader."""


class PeerLink:
    """Packets (uint8 arrays) to and from one peer rank, in order: a length, then the bytes."""

    def __init__(self, group, peer: int):
        self.group, self.peer = group, peer

    def send(self, packet: np.ndarray) -> None:
        data = torch.from_numpy(np.ascontiguousarray(packet, dtype=np.uint8))
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), self.peer, group=self.group)
        dist.send(data, self.peer, group=self.group)

    def recv(self) -> np.ndarray:
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, self.peer, group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, self.peer, group=self.group)
        return data.numpy()


class GroupCast:
    """The group leader's packets to every rank of its group, in order (a broadcast: the length,
    then the bytes). The leader calls `send`, the others `recv`."""

    def __init__(self, group, leader: int, size: int):
        self.group, self.leader, self.size = group, leader, size

    def send(self, packet: np.ndarray) -> None:
        data = torch.from_numpy(np.ascontiguousarray(packet, dtype=np.uint8))
        dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), self.leader, group=self.group)
        dist.broadcast(data, self.leader, group=self.group)

    def recv(self) -> np.ndarray:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, self.leader, group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, self.leader, group=self.group)
        return data.numpy()


def replica_links(topology: Topology) -> dict[int, PeerLink]:
    """On the serving rank: {group leader rank: link} for every other group; on another group's
    leader: {serving rank: link}; {} elsewhere and on one process. Every rank must call it (group
    creation is collective)."""
    links: dict[int, PeerLink] = {}
    if not topology.distributed:
        return links
    # a group's leader that finds a peer of its group silent has the timeout to notice and a few
    # seconds to name it: the serving rank waits that long before it gives up on the leader itself
    report_s = GROUP_REPORT_S if topology.group_size > 1 else 0.0
    timeout = timedelta(seconds=topology.cfg.timeout_s + report_s)
    for peer in range(topology.group_size, topology.world_size, topology.group_size):  # other groups' leaders
        group = dist.new_group([SERVING_RANK, peer], backend="gloo", timeout=timeout)
        if topology.rank == SERVING_RANK:
            links[peer] = PeerLink(group, peer)
        elif topology.rank == peer:
            links[SERVING_RANK] = PeerLink(group, SERVING_RANK)
    return links


def group_cast(topology: Topology) -> GroupCast | None:
    """This rank's group's round packets (None for a group of one rank). Every rank must call it."""
    if not topology.distributed or topology.group_size == 1:
        return None
    timeout = timedelta(seconds=topology.cfg.timeout_s)
    mine = None
    for start in range(0, topology.world_size, topology.group_size):
        ranks = list(range(start, start + topology.group_size))
        group = dist.new_group(ranks, backend="gloo", timeout=timeout)
        if topology.rank in ranks:
            mine = GroupCast(group, start, len(ranks))
    return mine
