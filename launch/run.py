"""One rank's part of a run, shared by generate, stream and the benchmarks.

A compute rank loads the model and runs its session's plan (on one process, the whole stream;
in a cascade, its share, with every finished block arriving at the sink rank). A dedicated
decode rank holds only the decoder and receives the finished blocks as the plan says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from engine.config import ConfigError, Preset, SpeedConfig
from engine.loading import build_decoder
from engine.plan.timeline import Tick
from engine.runtime.outputs import Block, RunStats
from engine.runtime.session import Run, Session
from engine.weight_paths import WeightPaths
from launch.build import EAGER, build_session
from launch.cli import ALIKE_ON_EVERY_RANK, USER_ERRORS, parallel_from_args, preset_from_args, say_user_error
from launch.threads import configure_threads
from parallel.cascade import decode_rank_plan
from parallel.runtime import RankFailure, launched
from parallel.topology import Topology, TopologyError
from parallel.ulysses import resolve_backend

T = TypeVar("T")


class RankRun:
    def __init__(
        self,
        preset: Preset,
        weights: WeightPaths,
        device: torch.device,
        dtype: torch.dtype,
        topology: Topology,
        threads: int | None = None,
        speed: SpeedConfig = EAGER,
        gpu_memory: int | None = None,
    ):
        if topology.cfg.replicas > 1:
            raise TopologyError("--replicas splits a sessions server (engine.stream) into rank groups; one stream "
                                "runs on every rank: drop --replicas")  # fmt: skip
        check_ranks(preset, topology)
        self.preset, self.topology = preset, topology
        self.session: Session | None = None
        if topology.is_compute:
            self.session = build_session(preset, weights, device, dtype, topology, speed=speed, gpu_memory=gpu_memory)
            configure_threads(threads, self.session.model, device)
            if topology.rank == 0:
                print(self.session.executors.speed_line, file=sys.stderr)
            if topology.cfg.sp > 1 and topology.rank == 0:
                print(_sp_line(preset, topology), file=sys.stderr)
            self.decoder = self.session.decoder
        else:
            self.decoder = build_decoder(preset, weights, device, getattr(torch, speed.vae_dtype))
        self.run: Run | None = None

    def blocks(
        self,
        prompt: str | Callable[[Tick], str],
        *,
        blocks: int | None,
        seed: int,
        start: torch.Tensor | None = None,
        **video_in,
    ) -> Iterator[Block]:
        """This rank's finished blocks, in order: every block on the sink rank, none elsewhere.
        `prompt(tick)` is called once per tick on every rank (live streams broadcast controls there).
        `start`: clean latents the stream starts from (one process only, for now); `video_in`,
        `strength`: video-to-video on one process (Session.run)."""
        if video_in and (self.session is None or self.topology.distributed):
            raise ConfigError("--video-in runs on one process (not under torchrun)")
        if self.session is not None:
            self.run = self.session.run(prompt, blocks=blocks, seed=seed, start=start, **video_in)
            return iter(self.run) if self.topology.is_decoder else _share_only(self.run)
        on_tick = prompt if callable(prompt) else (lambda tick: None)
        return decode_rank_plan(self.preset, self.topology, blocks, on_tick=on_tick)

    def stats(self) -> RunStats | None:
        """The executor's statistics so far (None on a decode rank or before a run)."""
        return None if self.run is None else self.run.stats


def check_ranks(preset: Preset, topology: Topology) -> None:
    """Refuse a layout the preset's plan cannot use. A cascade takes any `cascade x sp` (+ decode
    rank); every other plan (sequential, pyramid, skyreels) runs on one sp group whose ranks share
    each forward (+ a decode rank, but for skyreels); the sink rank writes or serves."""
    if not topology.distributed:
        return
    if preset.plan.schedule == "cascade":
        if topology.cascade_size > 1 and preset.plan.compute != "selective":
            raise TopologyError("cascade stages hand each other the KV cache, which --compute "
                                f"{preset.plan.compute} does not build: add --compute selective")  # fmt: skip
        return
    schedule, compute = preset.plan.schedule, topology.compute_ranks
    if topology.cascade_size > 1:
        raise TopologyError(f"{compute} compute processes run a {schedule} plan as one sp group: add --sp {compute} "
                            f"(sp ranks share each forward), or use --schedule cascade")  # fmt: skip
    if topology.cfg.decode_rank and schedule == "skyreels":
        raise TopologyError("--decode-rank does not go with --schedule skyreels (each segment reads the blocks "
                            "before it on every rank): drop --decode-rank")  # fmt: skip


def _sp_line(preset: Preset, topology: Topology) -> str:
    backend, sp = resolve_backend(topology.cfg.sp_backend), topology.cfg.sp
    if preset.plan.schedule == "cascade":
        return f"sequence parallelism: cascade {topology.cascade_size} x sp {sp}, all-to-all: {backend}"
    schedule = preset.plan.schedule
    return f"sequence parallelism: sp {sp} share every forward of the {schedule} plan, all-to-all: {backend}"


def _share_only(run: Iterable[Block]) -> Iterator[Block]:
    """An sp rank beside the sink: its share of every forward, no output (a cascade's other ranks
    yield nothing already; a plan on one sp group finishes every block on every rank)."""
    for _ in run:
        pass
    yield from ()


def on_ranks(args: argparse.Namespace, body: Callable[[Topology], T]) -> tuple[int, T | None]:
    """An entry point's run on this rank: (exit code, what `body(topology)` returned). A user error
    is one line and exit code 2 (a settings error every rank meets, said once); a failed rank is
    named, exit code 1."""
    try:
        with launched(parallel_from_args(args, preset_from_args(args)), alike=ALIKE_ON_EVERY_RANK) as topology:
            return 0, body(topology)
    except USER_ERRORS as err:
        return say_user_error(err), None
    except RankFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1, None
