"""Who does what in a multi-process run: the device mesh, built once from torchrun's environment.

    world = replicas x group,   group = cascade x sp compute ranks (+ 1 decode rank when asked for)

The world splits into `replicas` rank groups of equal size (default: one group of every rank).
A group runs streams on its own: its compute ranks form the ("cascade", "sp") dims of a
`DeviceMesh` whose first dim ("replica") says which group; each cascade rank holds its share of
a stream's in-flight blocks (parallel/cascade.py), sp is sequence parallelism inside a block. A
group's decode rank (its last rank) only receives finished blocks, decodes and writes them;
without one, the group's first rank does that beside its compute. Ranks are global everywhere
(what `dist` takes); `local` is a rank's place inside its group. NCCL on CUDA, gloo on CPU.
Groups live on this object and are passed explicitly; nothing is kept in module globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from parallel.faults import FaultReporter


class TopologyError(RuntimeError):
    """A process layout that cannot run (said at launch, before any weights load)."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    cascade: int | None = None
    """Ranks in the cascade dimension; None = every compute rank."""
    sp: int = 1
    """Sequence-parallel (Ulysses) ranks sharing each forward of a cascade stage."""
    sp_backend: str = "auto"
    """The sp all-to-all: yunchang's, torch's all_to_all_single, or auto (yunchang when installed)."""
    decode_rank: bool = False
    """Reserve the last rank for decoding and serving."""
    timeout_s: float = 120.0
    """A collective or a peer that takes longer than this ends the job with an error."""
    replicas: int = 1
    """Rank groups the world splits into, each a cascade x sp (+ decode rank) serving its own sessions."""


def _layout(world: int, cfg: ParallelConfig) -> tuple[int, int]:
    """(cascade, compute ranks) of one group for a world size, or a clear error."""
    if cfg.replicas < 1 or world % cfg.replicas:
        raise TopologyError(f"--replicas {cfg.replicas} must divide the {world} processes into groups of equal size")
    world //= cfg.replicas
    compute = world - (1 if cfg.decode_rank else 0)
    if compute < 1:
        raise TopologyError(f"a decode rank needs at least 2 processes per group, got {world}")
    if cfg.sp < 1 or compute % cfg.sp:
        raise TopologyError(f"--sp {cfg.sp} must divide the {compute} compute processes")
    cascade = cfg.cascade or compute // cfg.sp
    if cascade * cfg.sp != compute:
        extra = " + 1 decode rank" if cfg.decode_rank else ""
        groups = f" in each of {cfg.replicas} groups" if cfg.replicas > 1 else ""
        raise TopologyError(
            f"cascade {cascade} x sp {cfg.sp}{extra} = {cascade * cfg.sp + (1 if cfg.decode_rank else 0)} "
            f"processes{groups}, but torchrun started {world * cfg.replicas}"
        )
    return cascade, compute


def _group_options(backend: str, timeout: timedelta):
    """Options that carry `timeout` to groups the device mesh creates."""
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


def _mesh(device_type: str, backend: str, timeout: timedelta, world: int, cascade: int, compute: int,
          cfg: ParallelConfig) -> DeviceMesh:  # fmt: skip
    """The compute ranks' mesh: ("cascade", "sp") for one group, ("replica", "cascade", "sp") for
    several (a rank's cascade and sp groups are then its own group's). Its groups get the job's
    timeout, not torch's default of 30 minutes (compute ranks only, with a decode rank)."""
    group = world // cfg.replicas
    starts = torch.arange(cfg.replicas).mul(group).view(-1, 1, 1)
    ranks = starts + torch.arange(compute).view(1, cascade, cfg.sp)  # [replica, cascade, sp] global ranks
    names = ("replica", "cascade", "sp")
    if cfg.replicas == 1:  # one group: no replica dim (and no groups made for it)
        ranks, names = ranks[0], names[1:]
    groups = ((backend, _group_options(backend, timeout)),) * len(names)
    return DeviceMesh(device_type, ranks, mesh_dim_names=names, backend_override=groups)


class Topology:
    """The ranks of one run and their groups. `Topology.single()` is the one-process case."""

    def __init__(self, cfg: ParallelConfig, rank: int, world: int, local_rank: int, mesh: DeviceMesh | None):
        self.cfg, self.rank, self.world_size, self.local_rank, self.mesh = cfg, rank, world, local_rank, mesh
        self.cascade_size, self.compute_ranks = _layout(world, cfg)
        self.group_size = world // cfg.replicas
        self.group, self.local = divmod(rank, self.group_size)
        self.group_start = self.group * self.group_size
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        self.faults = FaultReporter(rank, world)

    @classmethod
    def single(cls) -> Topology:
        return cls(ParallelConfig(), 0, 1, 0, None)

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> Topology:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls.single()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cascade, compute = _layout(world, cfg)  # fail before starting any group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        timeout = timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend, timeout=timeout)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = _mesh(device_type, backend, timeout, world, cascade, compute, cfg)
        return cls(cfg, rank, world, local_rank, mesh)

    # -- roles -------------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_compute(self) -> bool:
        return self.local < self.compute_ranks

    @property
    def is_decoder(self) -> bool:
        """The rank that receives its group's finished blocks in order and writes/serves them."""
        return self.rank == self.sink

    @property
    def sink(self) -> int:
        """Global rank of this group's output: its decode rank, or its first rank."""
        return self.group_start + (self.group_size - 1 if self.cfg.decode_rank else 0)

    @property
    def leader(self) -> int:
        """Global rank of this group's first rank (which schedules the group's sessions)."""
        return self.group_start

    @property
    def group_ranks(self) -> list[int]:
        """Global ranks of this rank's group."""
        return list(range(self.group_start, self.group_start + self.group_size))

    @property
    def cascade_rank(self) -> int:
        return self.local // self.cfg.sp if self.is_compute else -1

    def cascade_group(self):
        return self.mesh.get_group("cascade") if self.mesh is not None and self.is_compute else None

    def sp_group(self):
        """The ranks sharing this rank's forwards (the same cascade stage)."""
        return self.mesh.get_group("sp") if self.mesh is not None and self.is_compute else None

    def stage_leader(self, stage: int) -> int:
        """The global rank that speaks for cascade stage `stage` of this group (its first sp rank)."""
        return self.group_start + stage * self.cfg.sp

    def owner(self, block: int) -> int:
        """Cascade rank that denoises `block`: round robin, so neighbours sit on different ranks."""
        return block % self.cascade_size

    def broadcast_control(self, packet: torch.Tensor) -> None:
        """The serving rank's control packet to every rank, in place (engine/serving/controls.py)."""
        if self.distributed:
            dist.broadcast(packet, src=self.sink)

    def check_plan(self, in_flight: int, steps: int, offset: int) -> None:
        """Refuse a cascade whose ranks the plan could never all keep busy. One block in flight
        (offset >= steps + 1) is allowed: blocks then take turns over the ranks, which is
        sequential generation spread over processes (a check of the cascade, not a speedup)."""
        if in_flight > 1 and self.cascade_size > in_flight:
            fixes = [f"use at most {in_flight} cascade ranks"] + (["lower --offset"] if offset > 1 else [])
            fixes.append(f"more steps (--steps): {steps} steps keep at most {steps + 1} blocks in flight")
            raise TopologyError(
                f"the plan keeps at most {in_flight} blocks in flight ({steps} steps, offset {offset}), so "
                f"{self.cascade_size} cascade ranks cannot all work: {'; or '.join(fixes)}"
            )

    def close(self) -> None:
        self.faults.close()
        if dist.is_initialized():
            dist.destroy_process_group()
