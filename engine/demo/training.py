"""Training the demo model with a diffusion-forcing objective.

A batch is clips of `clip_blocks` blocks. Every block gets its own noise level (a share of them
clean), so the model learns to denoise a block whatever the state of the blocks before it: clean
committed context (sequential plans), partly denoised context (pyramid plans, the cascade), or
noise. Attention between blocks is block-causal, as at inference. Each block carries its own
prompt, so clips that switch description mid-way teach the model to follow a prompt switch.
The loss is the flow-matching MSE on blocks that are not clean, weighted up where the shape is
(in the frame or the frame before): the background is a few percent of the work once it is
learned, and an unweighted loss is content to copy the shape where it last was instead of moving it.

Diffusion forcing only ever shows the model true context. `engine.demo.rollout` adds blocks made
on the model's own generated context (exposure bias: errors that compound over a long stream);
`engine.demo.trainer` runs both in one step and saves everything needed to resume exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import Preset
from engine.demo.pixels import PatchCodec
from engine.demo.scenes import foreground, make_clip
from engine.demo.vocab import VocabEncoder
from engine.models.attention import LocalView
from engine.models.rope import Rope
from engine.models.wan import WanModel


def _option(default, help: str):
    """A config field with the help text its command-line flag shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = _option(1400, "training steps (the learning rate decays over them)")
    batch: int = _option(12, "diffusion-forcing clips per step (0: rollout streams only)")
    clip_blocks: int = _option(3, "blocks per diffusion-forcing clip")
    lr: float = _option(8e-4, "peak AdamW learning rate")
    warmup: int = _option(100, "linear warm-up steps, then cosine decay to 10%%")
    weight_decay: float = _option(0.01, "AdamW weight decay")
    clean_share: float = _option(0.25, "share of diffusion-forcing blocks given no noise (committed context)")
    grid_share: float = _option(0.5, "share of noisy blocks put exactly on the grid levels; the rest uniform")
    grid: tuple[float, ...] = _option((), "noise levels of that share (empty: the levels sampling visits)")
    switch_share: float = _option(0.25, "share of clips whose description changes at a block boundary")
    start_share: float = _option(0.4, "share of clips that are a stream's start (shape centred, first block noisy)")
    shape_weight: float = _option(8.0, "extra loss weight on latent pixels near the shape (0: plain MSE)")
    ema: float = _option(0.999, "EMA decay of the saved weights")
    codec_clips: int = _option(400, "clips whose patches fit the latent space (PCA), when not --init")
    seed: int = _option(0, "seed of data, noise and fresh weights")
    bf16: bool = _option(True, "bf16 autocast (AMX/AVX512-BF16 on CPUs that have it; tensor cores on GPUs)")
    rollout_streams: int = _option(0, "self-generated streams advanced one block per step (0: none)")
    rollout_min_blocks: int = _option(4, "shortest rollout stream, in blocks")
    rollout_max_blocks: int = _option(60, "longest rollout stream, in blocks (the window holds 3)")
    rollout_weight: float = _option(1.0, "weight of the rollout loss next to the diffusion-forcing loss")
    own_start: float = _option(0.5, "share of rollout streams whose first block the model makes itself")
    own_input: float = _option(0.5, "share of rollout blocks trained from the sampler's own noisy input")
    rollout_switch: float = _option(0.04, "per-block probability of a prompt switch in a rollout stream")


def fit_codec(preset: Preset, cfg: TrainConfig) -> PatchCodec:
    """The latent space: PCA of pixel patches over `codec_clips` clips of their own seed."""
    rng = np.random.default_rng(cfg.seed + 1)
    frames = np.stack([make_clip(rng, frames=preset.stream.frames_per_block, size=preset.stream.height).frames
                       for _ in range(cfg.codec_clips)])  # fmt: skip
    return PatchCodec.fit(frames, preset.vae.patch, preset.vae.z_dim)


SHAPE_DISTANCE = 30.0  # summed |RGB difference| from the row's median that marks the shape, anti-aliased edges too


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, F, h, w]
    prompts: list[str]  # one per block, batch-major
    mid_stream: torch.Tensor  # [B] bool: a window from mid-stream (first block is clean context)
    weights: torch.Tensor  # [B, F, h, w] loss weight per latent pixel

    def to(self, device) -> Batch:
        return Batch(self.latents.to(device), self.prompts, self.mid_stream, self.weights.to(device))


def make_batch(preset: Preset, cfg: TrainConfig, codec: PatchCodec, rng: np.random.Generator) -> Batch:
    """Clips of `clip_blocks` blocks. A stream's first block has no context and starts centred; a
    mid-stream window's shape is anywhere, so its first block is only ever clean context (the
    model never learns to make a context-free block with the shape at a random place)."""
    block = preset.stream.frames_per_block
    mid_stream = rng.random(cfg.batch) >= cfg.start_share
    clips = [
        make_clip(rng, frames=cfg.clip_blocks * block, size=preset.stream.height, block_frames=block,
                  switch_probability=cfg.switch_share, centred=not mid)
        for mid in mid_stream
    ]  # fmt: skip
    frames = np.stack([c.frames for c in clips])
    prompts = [clip.prompts[b * block] for clip in clips for b in range(cfg.clip_blocks)]
    weights = shape_weights(frames, codec.patch, cfg.shape_weight)
    return Batch(codec.encode(frames), prompts, torch.from_numpy(mid_stream), weights)


def shape_weights(frames: np.ndarray, patch: int, extra: float) -> torch.Tensor:
    """`[B, F, H/patch, W/patch]`: 1 + `extra` on latent pixels within one latent pixel of the
    shape in this frame or the one before (where it goes and where it was), 1 elsewhere."""
    shape = foreground(frames, SHAPE_DISTANCE)  # frames [B, F, H, W, 3] -> [B, F, H, W]
    mask = torch.from_numpy(shape).float()
    mask = torch.maximum(mask, torch.cat([mask[:, :1], mask[:, :-1]], dim=1))
    mask = torch.nn.functional.max_pool2d(mask.flatten(0, 1), patch)  # [B F, h, w]
    mask = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1).view(*shape.shape[:2], *mask.shape[-2:])
    return 1.0 + extra * mask


def context_first(sigma: torch.Tensor, mid_stream: torch.Tensor, block_frames: int) -> torch.Tensor:
    """Noise levels `[B, F]` with the first block of mid-stream clips made clean."""
    sigma = sigma.clone()
    sigma[mid_stream, :block_frames] = 0.0
    return sigma


def block_sigmas(
    batch: int,
    blocks: int,
    block_frames: int,
    clean_share: float,
    generator,
    grid: tuple[float, ...] = (),
    grid_share=0.0,
) -> torch.Tensor:
    """Per-frame noise levels `[B, F]`, constant within a block: 0 with `clean_share`, else one of
    `grid` with `grid_share`, else U(0, 1] (so that many-step plans work too)."""
    sigma = 1.0 - torch.rand(batch, blocks, generator=generator)  # (0, 1]
    if grid:
        levels = torch.tensor(grid)[torch.randint(len(grid), (batch, blocks), generator=generator)]
        on_grid = torch.rand(batch, blocks, generator=generator) < grid_share
        sigma = torch.where(on_grid, levels, sigma)
    clean = torch.rand(batch, blocks, generator=generator) < clean_share
    return sigma.masked_fill(clean, 0.0).repeat_interleave(block_frames, dim=1)


def diffusion_forcing_loss(
    model: WanModel,
    words: VocabEncoder,
    rope: Rope,
    batch: Batch,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    block_frames: int,
) -> torch.Tensor:
    """Weighted MSE between predicted and true flow (noise - x0) over the noisy blocks."""
    latents = batch.latents
    frames = latents.shape[2]
    s = sigma[:, None, :, None, None]
    noisy = (1 - s) * latents + s * noise
    text = model.embed_text(words.states(batch.prompts))  # batch B * blocks: one prompt per block
    flow = model(noisy, sigma, text, LocalView(rope, 0, frames, block_frames, "causal"))
    error = (flow.float() - (noise - latents)).pow(2).mean(dim=1)  # [B, F, h, w]
    weight = batch.weights.to(error.device) * (sigma > 0).float()[:, :, None, None]
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters, with a decay that warms up (1 + t) / (10 + t)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the modules for the duration, then the trained ones back."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained):
                    param.copy_(value)

    @torch.no_grad()
    def copy_to(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)
