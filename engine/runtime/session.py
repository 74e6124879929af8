"""A loaded model and everything needed to run its plans: the one-device generation path.

`Pipeline.build(preset, weights, device, dtype)` loads (or seeds) the transformer, text encoder
and VAE once. `latents(prompt, blocks, seed)` runs the preset's plan through the executor and
yields clean blocks in order; `generate(...)` also decodes each block to frames as it arrives.
Nothing here knows about CLIs or sockets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import torch

from cache import make_policy
from cache.executor import CachingExecutor
from engine.config import ConfigError, Preset
from engine.demo.pixels import PatchDecoder
from engine.loading import (
    WeightPaths,
    build_decoder,
    build_kv_cache,
    build_model,
    build_rope,
    build_text_encoder,
)
from engine.models.magi import CaptionKV, MagiModel, MagiText
from engine.models.text_encoder import PromptEncoder
from engine.models.vae import StreamingDecoder, to_uint8
from engine.models.wan import TextKV, WanModel
from engine.plan.sigmas import build_schedule
from engine.plan.skyreels import Segment, plan_segments, run_segments
from engine.plan.timeline import Tick, blocks_per_tick, pyramid, sequential
from engine.runtime.executor import Block, Executor, ExecutorStats
from engine.runtime.lagged import LaggedExecutor
from engine.runtime.recache import RecacheExecutor
from engine.sampling.guidance import ClassifierFree, Guidance
from engine.sampling.magi_guidance import WINDOW as MAGI_WINDOW
from engine.sampling.magi_guidance import MagiGuidance, magi_text
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import make_solver
from parallel.cascade import CachingCascadeJoint, CascadeJoint, CascadeLagged, deliver
from parallel.topology import Topology

CACHED_TEXT_KV = 8


class Pipeline:
    """Loaded components for one preset: transformer, text encoder, VAE decoder."""

    def __init__(
        self,
        preset: Preset,
        model: WanModel | MagiModel,
        text: PromptEncoder,
        decoder: StreamingDecoder | PatchDecoder,
        device: torch.device,
        topology: Topology | None = None,
    ):
        self.preset = preset
        self.topology = topology or Topology.single()
        self.model = model
        self.text = text
        self.decoder = decoder
        self.device = device
        self.schedule = build_schedule(preset.sampling)
        self.rope = build_rope(preset, device, model)
        self.stats: list[ExecutorStats] = []
        """Per executor (one per SkyReels segment) of the latest `latents` run."""
        self.executors: list[Executor] = []
        """The executors of the latest `latents` run (cache statistics live on them)."""
        self._text_kv: OrderedDict[str, TextKV] = OrderedDict()
        self._conditioning: OrderedDict[str, TextKV] = OrderedDict()
        self._null_caption: CaptionKV | None = None

    @classmethod
    def build(
        cls,
        preset: Preset,
        weights: WeightPaths,
        device: torch.device,
        dtype: torch.dtype,
        topology: Topology | None = None,
    ) -> Pipeline:
        model = build_model(preset, weights, device, dtype)
        text = build_text_encoder(preset, weights, device, dtype)
        return cls(preset, model, text, build_decoder(preset, weights, device), device, topology)

    @property
    def cascaded(self) -> bool:
        """A cascade across ranks (one process runs the same plan as a pyramid)."""
        return self.preset.plan.schedule == "cascade" and self.topology.distributed

    # -- conditioning ----------------------------------------------------------------------------

    def text_kv(self, prompt: str) -> TextKV | MagiText:
        """Cross-attention K/V of a prompt, computed once and kept for recent prompts."""
        if prompt not in self._text_kv:
            with torch.no_grad():
                self._text_kv[prompt] = self._embed_prompt(prompt)
        self._text_kv.move_to_end(prompt)
        while len(self._text_kv) > CACHED_TEXT_KV:
            self._text_kv.popitem(last=False)
        return self._text_kv[prompt]

    def _embed_prompt(self, prompt: str) -> TextKV | MagiText:
        states = self.text.encode(prompt).to(self.device)  # [1, L, text_dim], zero past the prompt
        if self.preset.model.family != "magi":
            return self.model.embed_text(states)
        if self._null_caption is None:
            self._null_caption = self.model.null_caption()
        length = max(int((states[0].abs().sum(-1) > 0).sum()), 1)  # real tokens (once per prompt)
        return magi_text(self.model, states, length, self._null_caption)

    def conditioning(self, prompt: str) -> TextKV | MagiText:
        """The prompt's K/V; with guidance, stacked with the negative prompt's as batch [cond, uncond].
        The same prompt gives the same object (a switch is a change of object)."""
        if not self.preset.sampling.guided:
            return self.text_kv(prompt)
        key = f"{prompt}\x00{self.preset.sampling.negative_prompt}"
        if key not in self._conditioning:
            negative = self.text_kv(self.preset.sampling.negative_prompt)
            self._conditioning[key] = TextKV.stack(self.text_kv(prompt), negative)
        self._conditioning.move_to_end(key)
        while len(self._conditioning) > CACHED_TEXT_KV:
            self._conditioning.popitem(last=False)
        return self._conditioning[key]

    # -- executors and plans -----------------------------------------------------------------------

    def executor(self, noise: NoiseSource, *, blocks_in_forward: int, ring_frames: int | None = None) -> Executor:
        """An executor for one stream (or one segment), with its own KV cache when selective."""
        preset, sampling, plan = self.preset, self.preset.sampling, self.preset.plan
        frames = preset.stream.frames_per_block
        kind, extra = self._executor_kind()
        guidance = self.guidance()
        if kind is RecacheExecutor:  # a recache reruns the whole visible window in one forward
            blocks_in_forward = max(blocks_in_forward, -(-preset.stream.context_frames // frames))
        cache = None
        if plan.compute == "selective":
            cache = build_kv_cache(
                preset,
                self.model.dtype,
                self.device,
                batch=guidance.branches,
                scratch_frames=blocks_in_forward * frames,
                ring_frames=ring_frames,
                rope=self.rope,
            )
            if guidance.branches == 2 and preset.model.family == "magi":
                cache.commit_from = 1  # the null-caption pass writes the clean K/V both passes read
        executor = kind(
            self.model,
            schedule=self.schedule,
            solver=make_solver(sampling.solver, self.schedule, noise),
            noise=noise,
            block_shape=preset.latent_shape(frames),
            rope=self.rope,
            attention=plan.attention,
            compute=plan.compute,
            cache=cache,
            guidance=guidance,
            fps=preset.stream.fps if preset.model.fps_embedding else None,
            prefix_noise_t=plan.addnoise_condition,
            history_reach=plan.history_reach,
            commit_reach=plan.commit_reach,
            **extra,
        )
        self.stats.append(executor.stats)
        self.executors.append(executor)
        return executor

    def guidance(self) -> Guidance:
        """The model family's guidance: classifier-free (Wan) or MAGI-1's."""
        sampling = self.preset.sampling
        if sampling.magi is None:
            return ClassifierFree(sampling.guidance_scale)
        reach = self.preset.plan.history_reach
        return MagiGuidance(sampling.magi, self.schedule, len(reach) if reach else MAGI_WINDOW, sampling.shortcut)

    def _executor_kind(self) -> tuple[type[Executor], dict]:
        plan = self.preset.plan
        if self.preset.cache.enabled:
            policy = make_policy(
                self.preset.cache.policy,
                threshold=self.preset.cache.threshold,
                steps=self.schedule.steps,
                dim=self.preset.model.dim,
                warmup=self.preset.cache.warmup,
            )
            if self.cascaded:
                return CachingCascadeJoint, {"topology": self.topology, "policy": policy}
            return CachingExecutor, {"policy": policy}
        if self.cascaded:
            return (CascadeLagged if plan.context == "lagged" else CascadeJoint), {"topology": self.topology}
        if plan.switch == "recache":
            return RecacheExecutor, {}
        return (LaggedExecutor if plan.context == "lagged" else Executor), {}

    def plan(self, num_blocks: int | None) -> Iterator[Tick]:
        """The preset's sequential or pyramid plan (SkyReels plans are built per segment)."""
        plan, stream = self.preset.plan, self.preset.stream
        window = stream.window_frames // stream.frames_per_block
        if plan.history_reach is not None:  # a whole-window view must hold every block in reach
            window = max(window, *plan.history_reach, plan.commit_reach)
        if plan.schedule == "sequential":
            return sequential(self.schedule, num_blocks=num_blocks, window_blocks=window)
        return pyramid(self.schedule, offset=plan.offset, num_blocks=num_blocks, window_blocks=window)

    # -- running -----------------------------------------------------------------------------------

    def latents(
        self,
        prompt: str | Callable[[Tick], str],
        *,
        blocks: int | None,
        seed: int,
        initial: Callable[[int], torch.Tensor] | None = None,
    ) -> Iterator[Block]:
        """Clean latent blocks in stream order. `prompt` may depend on the tick (prompt switches);
        `initial(b)` overrides block b's starting noise. Bad plans fail here, before any work."""
        text = (lambda tick: self.conditioning(prompt(tick))) if callable(prompt) else self.conditioning(prompt)
        noise = NoiseSource(seed)
        self.stats, self.executors = [], []
        plan = self.preset.plan
        if plan.schedule == "skyreels":
            return self._skyreels(text, noise, blocks, initial)
        offset = None if plan.schedule == "sequential" else plan.offset
        in_flight = blocks_per_tick(self.schedule, offset, blocks)
        executor = self.executor(noise, blocks_in_forward=in_flight)
        if self.cascaded:
            self.topology.check_plan(in_flight, self.schedule.steps, plan.offset)
            executor.start(initial=initial)
            return deliver(executor, self.plan(blocks), text, self.topology)
        return executor.run(self.plan(blocks), text, initial=initial)

    def _skyreels(self, text, noise: NoiseSource, blocks: int | None, initial) -> Iterator[Block]:
        if blocks is None:
            raise ConfigError("the skyreels schedule makes finite videos: give a number of blocks")
        frames, plan = self.preset.stream.frames_per_block, self.preset.plan
        segments = plan_segments(blocks * frames, plan.segment_frames, plan.overlap_frames, frames)

        def make_executor(segment: Segment) -> Executor:
            segment_blocks = segment.frames // frames
            in_forward = blocks_per_tick(self.schedule, plan.offset, segment_blocks, segment.prefix_frames // frames)
            return self.executor(noise.fork(segment.index), blocks_in_forward=in_forward, ring_frames=segment.frames)

        return run_segments(segments, make_executor, text, offset=plan.offset, block_frames=frames, initial=initial)

    def generate(self, prompt: str, *, blocks: int | None, seed: int) -> Iterator[tuple[Block, np.ndarray]]:
        """Yield each finished block with its decoded frames `[F', H, W, 3]` uint8, in order."""
        blocks_out = self.latents(prompt, blocks=blocks, seed=seed)  # validates before the first yield
        self.decoder.reset()
        return ((block, to_uint8(self.decoder.decode(block.latents))) for block in blocks_out)
