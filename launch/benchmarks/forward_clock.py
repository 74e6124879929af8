"""Forward by forward: a stand-in for the session's runner that times each forward, counts its
FLOPs and stops the stream inside a block when the variant's time is spent.

Plans whose first block takes minutes at real size (SkyReels-V2's 30-step segments, MAGI-1's
64-step pyramid) cannot show a steady block within a report's budget; their forwards can. With
`per_forward` each forward is timed between device syncs; without, the clock only watches the
deadline (a sync per forward would cost the sequential plans their CPU run-ahead). Past the
deadline the clock profiles `profile_forwards` more forwards (attention / linear / rest) and then
raises `BudgetSpent`, which ends the stream.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import Preset
from engine.families import forward_flops
from launch.benchmarks.timing import op_shares, sync


class BudgetSpent(Exception):
    """The variant's time is up: the stream stops here, inside its block."""


class ForwardClock:
    """Wraps the runner the executors call: `clock(latents, sigma, text, view, **kw)`."""

    def __init__(self, runner, preset: Preset, device: torch.device, deadline: float, *, per_forward: bool,
                 profile_forwards: int = 0):  # fmt: skip
        self.runner, self.preset, self.device, self.deadline = runner, preset, device, deadline
        self.per_forward, self.profile_forwards = per_forward, profile_forwards
        self.forwards: list[tuple[float, float, int]] = []  # (start, seconds, FLOPs) per timed forward
        self.shares: dict[str, float] | None = None
        self._profiler, self._profiled = None, 0

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def __call__(self, latents: torch.Tensor, sigma, text, view, **kwargs) -> torch.Tensor:
        if time.time() > self.deadline:
            self._profile_step()
        start = time.perf_counter()
        out = self.runner(latents, sigma, text, view, **kwargs)
        if self.per_forward:
            sync(self.device)
            self.forwards.append((start, time.perf_counter() - start, self._flops(latents, view)))
        return out

    def _flops(self, latents: torch.Tensor, view) -> int:
        """`latents` [B, C, F, H, W]: B guidance rows of F query frames against the view's keys."""
        T, frames = self.preset.tokens_per_frame, latents.shape[2]
        keys = getattr(view, "key_frames", frames)
        return latents.shape[0] * forward_flops(self.preset.model, frames * T, keys * T, self.preset.text.text_len)

    def _profile_step(self) -> None:
        """Past the deadline: profile a few more forwards (once), then stop the stream."""
        if self._profiled >= self.profile_forwards:
            self._finish_profile()
            raise BudgetSpent
        if self._profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profiler = profile(activities=activities)
            self._profiler.start()
        self._profiled += 1

    def _finish_profile(self) -> None:
        if self._profiler is not None and self.shares is None:
            sync(self.device)
            self._profiler.stop()
            self.shares = op_shares(self._profiler, self.device)

    def summary(self, after: float | None) -> dict:
        """ms per forward and TFLOP/s over the forwards that started after `after` (perf_counter
        seconds: the first block's end, past the pipeline's fill), else over the later half."""
        timed = [f for f in self.forwards if after is not None and f[0] >= after]
        if not timed:
            timed = self.forwards[len(self.forwards) // 2 :]
        timed = timed[: len(timed) - self._profiled] if self._profiled else timed  # profiled ones run slower
        if not timed:
            return {}
        seconds, flops = sum(f[1] for f in timed), sum(f[2] for f in timed)
        return {
            "forward_ms": 1000 * seconds / len(timed),
            "tflops": flops / seconds / 1e12,
            "timed_forwards": len(timed),
        }
