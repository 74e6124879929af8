"""The composition root: a preset (+ weights, device, ranks) becomes a runnable session.

engine/ holds the loop and its pure parts and never imports cache/ or parallel/; this is the one
place that chooses among them. For every stream it builds an executor from the preset:

    context   = Joint | Lagged                 plan.context
    placement = Local | CascadeRank(topology)  plan.schedule == "cascade" under torchrun
    skip      = NoSkip | CacheSkip(policy)     cache.policy
    switch    = NextStep | Recache             plan.switch

Combinations that mean nothing are refused by the config (engine/config.py) with the reason.
How fast the same math runs (`SpeedConfig`: compiled forward, attention kernel, KV storage) and
where the weights live (fp8 weights, streamed blocks, the text encoder's device:
engine/runtime/memory_options.py) are chosen here too, once per session, and said in one line
(`Assembly.speed_line`).
"""

from __future__ import annotations

import functools
import logging

import torch

from cache import make_policy
from cache.skip import CacheSkip
from engine.config import ConfigError, Preset, SpeedConfig
from engine.families import family_of
from engine.footprint import size
from engine.loading import (
    build_decoder,
    build_model,
    build_rope,
    build_special_tokens,
    build_text_encoder,
    encoders_for,
)
from engine.plan.sigmas import build_schedule
from engine.runtime.backends import choose_attention, device_caps
from engine.runtime.compiled import FastForward
from engine.runtime.context import Joint, Lagged
from engine.runtime.executor import Executor, Parts, StreamSetup
from engine.runtime.kv import KVCache
from engine.runtime.memory_options import MemoryPlacement, encoder_home, model_home, place_model, refuse_early
from engine.runtime.placement import Local
from engine.runtime.prompts import Prompts
from engine.runtime.session import Session
from engine.runtime.sharding import ShardedModel, Ulysses
from engine.runtime.sharding import refusal as sp_refusal
from engine.runtime.skip import NoSkip
from engine.runtime.switch import NextStep, Recache
from engine.sampling.guidance import Guidance
from engine.sampling.noise import NoiseSource
from engine.sampling.solvers import make_solver
from engine.weight_paths import WeightPaths
from launch.memory import MemoryPlan, check, plan_run
from launch.parts import forward_blocks, make_guidance, stream_kv_cache
from parallel.cascade import CascadeRank, OneStage
from parallel.topology import Topology
from parallel.ulysses import GroupExchange

log = logging.getLogger(__name__)

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
    memory: MemoryPlan | None = None,
    gpu_memory: int | None = None,
) -> Session:
    """Load (or seed) the model, text encoder and decoder once; streams get their executors here.
    `sharding`: Ulysses over an sp group (default: the topology's, when it has sp > 1). `speed`:
    compiled forward, attention kernel and KV storage (checked against the device first). Nothing
    loads before the memory plan (`memory`, or counted here against `gpu_memory` or the device's
    free memory) says it fits: a run that cannot is refused in one line naming the flags that fit."""
    speed.check_device(device.type)
    refuse_early(speed, device)
    sharding = sharding or ulysses_for(topology, preset)
    if memory is None:
        shards = 1 if sharding is None else sharding.size
        memory = plan_run(preset, weights, device, dtype, speed, gpu_memory=gpu_memory, head_shards=shards)
    check(memory, device)
    log.info("memory plan for %s on %s: %s, budget %s", preset.name, device, memory.line(),
             "unknown" if memory.budget is None else size(memory.budget))  # fmt: skip
    model = build_model(preset, weights, model_home(speed, device), dtype)
    placement = place_model(model, speed, device)
    embed = family_of(preset.model).text_embedding(preset, model, build_special_tokens(preset, weights))
    encoder = build_text_encoder(preset, weights, encoder_home(speed, device), dtype)
    if speed.text_encoder_device == "swap":
        encoder.swap_to(device)
    prompts = Prompts(preset, model, encoder, device, embed)
    decoder = build_decoder(preset, weights, device, getattr(torch, speed.vae_dtype))
    if speed.vae_dtype != "float32":  # the demo's codec (kilobytes) ignores it: said, not hidden
        placement.vae = "float32 (the demo's patch codec)" if preset.vae.kind == "patches" else speed.vae_dtype
    assembly = Assembly(preset, model, device, topology, sharding, speed)
    assembly.memory = placement
    on_ranks = topology is not None and topology.distributed  # a given start is not yet shared between ranks
    start_encoder = None if on_ranks else functools.partial(family_of(preset.model).encode_start, preset)
    encoders = None if on_ranks else encoders_for(preset, decoder, device)  # video in: one process, likewise
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
        self.memory = MemoryPlacement()
        """Where the weights live (build_session sets it; said in `speed_line`)."""
        self.topology = topology or Topology.single()
        self._check_speed()
        self.fast = fast or FastForward(model, speed, choose_attention(speed.attention, device_caps(device)))
        self.runner = self.fast if sharding is None else self._sharded(sharding)
        self.schedule = build_schedule(preset.sampling)
        self.rope = build_rope(preset, device, model)

    def for_preset(self, preset: Preset) -> Assembly:
        """Executors for another plan: same model, same (already compiled) forward."""
        other = Assembly(preset, self.model, self.device, self.topology, self.sharding, self.speed, self.fast)
        other.memory = self.memory
        return other

    @property
    def speed_line(self) -> str:
        """How the forward runs here, in one line (entry points say it at start-up)."""
        line = self.fast.line()
        return line if self.memory == MemoryPlacement() else f"{line}; {self.memory.line}"

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
        blocks_in_forward = forward_blocks(preset, blocks_in_forward)
        cache = None if plan.compute == "window" else self._cache(blocks_in_forward, ring_frames)
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

    def _cache(self, blocks_in_forward: int, ring_frames: int | None) -> KVCache:
        head_shards = 1 if self.sharding is None else self.sharding.size
        return stream_kv_cache(self.preset, self.schedule, self.model.dtype, self.device,
                               blocks_in_forward=blocks_in_forward, ring=ring_frames, rope=self.rope,
                               head_shards=head_shards, storage=self.speed.kv_cache)  # fmt: skip

    def guidance(self) -> Guidance:
        """The model family's guidance: classifier-free (Wan) or MAGI-1's."""
        return make_guidance(self.preset, self.schedule)
