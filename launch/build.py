"""The composition root: a preset (+ weights, device, ranks) becomes a runnable session.

engine/ holds the loop and its pure parts and never imports cache/ or parallel/; this is the one
place that chooses among them. For every stream it builds an executor from the preset:

    context   = Joint | Lagged                 plan.context
    placement = Local | CascadeRank(topology)  plan.schedule == "cascade" under torchrun
    skip      = NoSkip | CacheSkip(policy)     cache.policy
    switch    = NextStep | Recache             plan.switch

Combinations that mean nothing are refused by the config (engine/config.py) with the reason.
How fast the same math runs (`SpeedConfig`: compiled forward, attention kernel, KV storage) is
chosen here too, once per session, and said in one line (`Assembly.speed_line`).
"""

from __future__ import annotations

import functools

import torch

from cache import make_policy
from cache.skip import CacheSkip
from engine.config import ConfigError, Preset, SpeedConfig
from engine.families import family_of
from engine.loading import (
    build_decoder,
    build_kv_cache,
    build_model,
    build_rope,
    build_special_tokens,
    build_text_encoder,
    encoders_for,
)
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import committed_blocks_needed
from engine.runtime.backends import choose_attention, device_caps
from engine.runtime.compiled import FastForward
from engine.runtime.context import Joint, Lagged
from engine.runtime.executor import Executor, Parts, StreamSetup
from engine.runtime.kv import KVCache
from engine.runtime.placement import Local
from engine.runtime.prompts import Prompts
from engine.runtime.session import Session
from engine.runtime.sharding import ShardedModel, Ulysses
from engine.runtime.sharding import refusal as sp_refusal
from engine.runtime.skip import NoSkip
from engine.runtime.switch import NextStep, Recache
from engine.sampling.guidance import ClassifierFree, Guidance
from engine.sampling.magi_guidance import WINDOW as MAGI_WINDOW
from engine.sampling.magi_guidance import MagiGuidance
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import make_solver
from engine.weight_paths import WeightPaths
from parallel.cascade import CascadeRank, OneStage
from parallel.topology import Topology
from parallel.ulysses import GroupExchange

EAGER = SpeedConfig()
"""The default speed settings: eager forward, torch's attention kernels, K/V in the model's dtype."""


def build_session(
    preset: Preset,
    weights: WeightPaths,
    device: torch.device,
    dtype: torch.dtype,
    topology: Topology | None = None,
    sharding: Ulysses | None = None,
    speed: SpeedConfig = EAGER,
) -> Session:
    """Load (or seed) the model, text encoder and decoder once; streams get their executors here.
    `sharding`: Ulysses over an sp group (default: the topology's, when it has sp > 1). `speed`:
    compiled forward, attention kernel and KV storage (checked against the device first)."""
    speed.check_device(device.type)
    model = build_model(preset, weights, device, dtype)
    embed = family_of(preset.model).text_embedding(preset, model, build_special_tokens(preset, weights))
    prompts = Prompts(preset, model, build_text_encoder(preset, weights, device, dtype), device, embed)
    decoder = build_decoder(preset, weights, device)
    assembly = Assembly(preset, model, device, topology, sharding or ulysses_for(topology, preset), speed)
    start_encoder = functools.partial(family_of(preset.model).encode_start, preset)
    encoders = encoders_for(preset, decoder, device)
    return Session(preset, model, prompts, decoder, device, assembly, start_encoder, encoders)


def ulysses_for(topology: Topology | None, preset: Preset, backend: str = "auto") -> Ulysses | None:
    """Sequence parallelism over the topology's sp group (None with sp 1)."""
    if topology is None or topology.cfg.sp == 1 or not topology.is_compute:
        return None
    return Ulysses(GroupExchange(topology.sp_group(), topology.cfg.sp_backend))


class Assembly:
    """Makes each stream's executor from the preset (the session's `ExecutorFactory`)."""

    def __init__(
        self,
        preset: Preset,
        model,
        device: torch.device,
        topology: Topology | None = None,
        sharding=None,
        speed: SpeedConfig = EAGER,
        fast: FastForward | None = None,
    ):
        self.preset, self.model, self.device, self.sharding, self.speed = preset, model, device, sharding, speed
        self.topology = topology or Topology.single()
        self._check_speed()
        self.fast = fast or FastForward(model, speed, choose_attention(speed.attention, device_caps(device)))
        self.runner = self.fast if sharding is None else self._sharded(sharding)
        self.schedule = build_schedule(preset.sampling)
        self.rope = build_rope(preset, device, model)

    def for_preset(self, preset: Preset) -> Assembly:
        """Executors for another plan: same model, same (already compiled) forward."""
        return Assembly(preset, self.model, self.device, self.topology, self.sharding, self.speed, self.fast)

    @property
    def speed_line(self) -> str:
        """How the forward runs here, in one line (entry points say it at start-up)."""
        return self.fast.line()

    def _check_speed(self) -> None:
        """Refuse a compiled forward where this runtime would break its graph."""
        if self.speed.compile == "off":
            return
        if self.sharding is not None:
            raise ConfigError("--compile with --sp: the all-to-all runs inside the forward; use --compile off")
        if self.preset.cache.policy in ("fbcache", "bwcache"):
            raise ConfigError(f"--cache {self.preset.cache.policy} reads layer outputs through hooks a compiled "
                              "forward does not run: use teacache, flowcache or scope with --compile")  # fmt: skip
        if self.cascaded and self.preset.plan.context == "joint":
            raise ConfigError("--compile with a joint cascade: ranks exchange K/V inside every layer of the "
                              "forward; use --context lagged (one exchange per tick) or --compile off")  # fmt: skip

    def _sharded(self, sharding: Ulysses) -> ShardedModel:
        cfg, preset = self.preset.model, self.preset
        why = sp_refusal(sharding.size, cfg.num_heads, cfg.kv_heads)
        if why:
            raise ConfigError(why)
        if preset.cache.policy in ("fbcache", "bwcache"):
            raise ConfigError(
                f"--cache {preset.cache.policy} reads layer features of each rank's own slice of the tokens, so the "
                "sp ranks of a stage would decide differently: use teacache, flowcache or scope with --sp"
            )
        return ShardedModel(self.model, sharding, preset.tokens_per_frame, self.fast.attention.context)

    @property
    def cascaded(self) -> bool:
        """A cascade across ranks (one process runs the same plan as a pyramid)."""
        return self.preset.plan.schedule == "cascade" and self.topology.distributed

    def __call__(self, noise: NoiseSource, *, blocks_in_forward: int, ring_frames: int | None = None) -> Executor:
        preset, plan = self.preset, self.preset.plan
        frames = preset.stream.frames_per_block
        guidance = self.guidance()
        if plan.switch == "recache":  # a recache reruns the whole visible window in one forward
            blocks_in_forward = max(blocks_in_forward, -(-preset.stream.context_frames // frames))
        cache = None if plan.compute == "window" else self._cache(guidance, blocks_in_forward, ring_frames)
        setup = StreamSetup(
            schedule=self.schedule,
            solver=make_solver(preset.sampling.solver, self.schedule, noise),
            noise=noise,
            block_shape=preset.latent_shape(frames),
            rope=self.rope,
            guidance=guidance,
            attention=plan.attention,
            compute=plan.compute,
            fps=preset.stream.fps if preset.model.fps_embedding else None,
            prefix_noise_t=plan.addnoise_condition,
            history_reach=plan.history_reach,
            commit_reach=plan.commit_reach,
        )
        self.fast.prepare_cache(cache)
        return Executor(self.runner, setup, cache, self.parts(cache, blocks_in_forward))

    def parts(self, cache: KVCache | None, blocks_in_forward: int) -> Parts:
        preset, plan = self.preset, self.preset.plan
        return Parts(
            context=Lagged() if plan.context == "lagged" else Joint(),
            placement=self._placement(cache, blocks_in_forward),
            skip=CacheSkip(self._policy()) if preset.cache.enabled else NoSkip(),
            switch=Recache() if plan.switch == "recache" else NextStep(),
        )

    def _placement(self, cache: KVCache | None, blocks_in_forward: int):
        if not self.cascaded:
            return OneStage(self.topology) if self.topology.distributed and self.topology.cfg.decode_rank else Local()
        self.topology.check_plan(blocks_in_forward, self.schedule.steps, self.preset.plan.offset)
        return CascadeRank(self.topology, cache, self.preset.stream.frames_per_block)

    def _policy(self):
        cache = self.preset.cache
        return make_policy(
            cache.policy, threshold=cache.threshold, steps=self.schedule.steps, dim=self.preset.model.dim,
            warmup=cache.warmup,
        )  # fmt: skip

    def _ring_frames(self) -> int:
        """The stream's recent window, widened where per-block reaches (MAGI-1) need more history."""
        plan, stream = self.preset.plan, self.preset.stream
        if plan.history_reach is None:
            return stream.ring_frames
        offset = None if plan.schedule == "sequential" else plan.offset
        needed = committed_blocks_needed(plan.history_reach, plan.commit_reach, self.schedule.steps, offset)
        return max(stream.ring_frames, needed * stream.frames_per_block)

    def _cache(self, guidance: Guidance, blocks_in_forward: int, ring_frames: int | None) -> KVCache:
        preset = self.preset
        ring_frames = self._ring_frames() if ring_frames is None else ring_frames
        cache = build_kv_cache(
            preset, self.model.dtype, self.device, batch=guidance.branches,
            scratch_frames=blocks_in_forward * preset.stream.frames_per_block, ring_frames=ring_frames, rope=self.rope,
            head_shards=1 if self.sharding is None else self.sharding.size, storage=self.speed.kv_cache,
        )  # fmt: skip
        cache.commit_from = family_of(preset.model).kv_commit_from(guidance.branches)
        return cache

    def guidance(self) -> Guidance:
        """The model family's guidance: classifier-free (Wan) or MAGI-1's."""
        sampling = self.preset.sampling
        if sampling.magi is None:
            return ClassifierFree(sampling.guidance_scale)
        reach = self.preset.plan.history_reach
        return MagiGuidance(sampling.magi, self.schedule, len(reach) if reach else MAGI_WINDOW, sampling.shortcut)
