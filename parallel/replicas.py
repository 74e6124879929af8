"""Links between the serving rank and the replica ranks of a sessions server
(engine/serving/replicas.py says what travels on them).

Each replica rank gets a two-rank gloo group with the serving rank, made once at start by every
rank alike. Packets are host memory (decoded frames, JSON), so gloo carries them on GPU jobs too,
and a group per replica means a dead or silent replica breaks only its own link: a receive from
it fails when its connection closes, or after the job's timeout when it says nothing.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from parallel.topology import Topology

SERVING_RANK = 0


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


def replica_links(topology: Topology) -> dict[int, PeerLink]:
    """On the serving rank: {replica rank: link}; on a replica rank: {serving rank: link}; {} on
    one process. Every rank must call it (group creation is collective)."""
    links: dict[int, PeerLink] = {}
    if not topology.distributed:
        return links
    timeout = timedelta(seconds=topology.cfg.timeout_s)
    for peer in range(topology.world_size):
        if peer == SERVING_RANK:
            continue
        group = dist.new_group([SERVING_RANK, peer], backend="gloo", timeout=timeout)
        if topology.rank == SERVING_RANK:
            links[peer] = PeerLink(group, peer)
        elif topology.rank == peer:
            links[SERVING_RANK] = PeerLink(group, SERVING_RANK)
    return links
