"""Training the demo model with a diffusion-forcing objective.

A batch is clips of `clip_blocks` blocks. Every block gets its own noise level (a share of them
clean), so the model learns to denoise a block whatever the state of the blocks before it: clean
committed context (sequential plans), partly denoised context (pyramid plans, the cascade), or
noise. Attention between blocks is block-causal, as at inference. Each block carries its own
prompt, so clips that switch description mid-way teach the model to follow a prompt switch.
The loss is the flow-matching MSE on blocks that are not clean, weighted up where the shape is
(in the frame or the frame before): the background is a few percent of the work once it is
learned, and an unweighted loss is content to copy the shape where it last was instead of moving it.
Two optional terms aim at what a viewer reads first. The codec is linear, so each latent pixel's
mean RGB (the color its patch shows) is an exact linear readout of its latent: `color_weight`
adds the squared error of that readout, scaled to be comparable with the per-channel MSE, so
that error along the few directions that make a shape darker or bluer costs more than error
along the texture directions. `switch_weight` weights up the blocks from a prompt switch on,
where the model must redraw the shape instead of continuing its context.

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


def _option(default, help: str, choices: tuple | None = None):
    """A config field with the help text (and the choices) its command-line flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


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
    color_weight: float = _option(0.0, "weight of the decoded patch-color error next to the latent MSE (0: none)")
    switch_weight: float = _option(0.0, "extra loss weight on the 2 blocks from a prompt switch on (0: none)")
    pyramid_share: float = _option(0.0, "share of diffusion-forcing clips noised as a pyramid plan's joint forward")
    prefix_blocks: int = _option(1, "ground-truth blocks a rollout stream that does not start itself begins with")
    timesteps: tuple[float, ...] = _option((), "sampling steps (0-1000) of rollouts and grid (empty: the preset's)")
    teacher_timesteps: tuple[float, ...] = _option((), "a many-step sampler (0-1000) that teaches the few-step one")
    teacher_share: float = _option(0.0, "share of rollout blocks trained toward that sampler's output, not the truth")
    teacher_region: str = _option(
        "all",
        "where the teacher's output is the target: all, or near the shape (the truth elsewhere)",
        ("all", "shape"),
    )

    def __post_init__(self):
        """Refuse values that would train silently wrong, in one line naming the flag and its range."""
        shares = ("clean_share", "grid_share", "switch_share", "start_share", "own_start", "own_input",
                  "rollout_switch", "pyramid_share", "teacher_share")  # fmt: skip
        for name in shares:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a share: give a value from 0 to 1")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("--ema is a decay: give a value from 0 up to (not including) 1")
        if self.steps < 1 or self.batch < 0 or self.rollout_streams < 0:
            raise ValueError("--steps must be at least 1, --batch and --rollout-streams at least 0")
        if self.teacher_share and not self.teacher_timesteps:
            raise ValueError("--teacher-share needs a teacher: give --teacher-timesteps too")


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
    boost = switch_boost([clip.prompts[::block] for clip in clips], cfg.switch_weight)  # [B, blocks]
    weights = weights * boost.repeat_interleave(block, dim=1)[:, :, None, None]
    return Batch(codec.encode(frames), prompts, torch.from_numpy(mid_stream), weights)


SWITCH_SPAN = 2  # blocks from a switch on that are weighted up: "followed within 2 blocks"


def switch_boost(block_prompts: list[list[str]], extra: float) -> torch.Tensor:
    """`[B, blocks]`: 1 + `extra` on the SWITCH_SPAN blocks from a prompt change on, 1 elsewhere."""
    boost = torch.ones(len(block_prompts), len(block_prompts[0]))
    for row, prompts in enumerate(block_prompts):
        for b in range(1, len(prompts)):
            if prompts[b] != prompts[b - 1]:
                boost[row, b : b + SWITCH_SPAN] = 1.0 + extra
    return boost


def color_readout(codec: PatchCodec, weight: float) -> torch.Tensor | None:
    """`[3, k]`: the mean RGB of a latent pixel's decoded patch per unit of latent (the codec is
    linear, so this is exact up to clamping), scaled by sqrt(weight / |readout|^2) so that an error
    spread evenly over the k channels costs `weight` times its MSE in the color term. None at 0."""
    if not weight:
        return None
    p2 = codec.patch**2
    average = torch.zeros(3, 3 * p2)
    for c in range(3):  # patch channels are ordered (rgb, row, column)
        average[c, c * p2 : (c + 1) * p2] = 1.0 / p2
    readout = average @ codec.basis.T * codec.latent_std[None, :]
    return readout * math.sqrt(weight / readout.pow(2).sum())


def flow_error(flow: torch.Tensor, target: torch.Tensor, colors: torch.Tensor | None) -> torch.Tensor:
    """`[B, F, h, w]`: per latent pixel, the MSE over channels of `flow - target` `[B, k, F, h, w]`,
    plus the squared color readout of the same difference when `colors` (`color_readout`) is given."""
    diff = flow.float() - target
    error = diff.pow(2).mean(dim=1)
    if colors is not None:
        error = error + torch.einsum("ck,bkfhw->bcfhw", colors.to(diff.device), diff).pow(2).sum(dim=1)
    return error


def near_shape(frames: np.ndarray, patch: int) -> torch.Tensor:
    """`[B, F, H/patch, W/patch]` bool: the latent pixels within one latent pixel of the shape in
    this frame or the one before (where it goes and where it was)."""
    shape = foreground(frames, SHAPE_DISTANCE)  # frames [B, F, H, W, 3] -> [B, F, H, W]
    mask = torch.from_numpy(shape).float()
    mask = torch.maximum(mask, torch.cat([mask[:, :1], mask[:, :-1]], dim=1))
    mask = torch.nn.functional.max_pool2d(mask.flatten(0, 1), patch)  # [B F, h, w]
    mask = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1).view(*shape.shape[:2], *mask.shape[-2:])
    return mask > 0


def shape_weights(frames: np.ndarray, patch: int, extra: float) -> torch.Tensor:
    """`[B, F, H/patch, W/patch]`: 1 + `extra` on the latent pixels `near_shape`, 1 elsewhere."""
    return shape_weights_from(near_shape(frames, patch), extra)


def shape_weights_from(near: torch.Tensor, extra: float) -> torch.Tensor:
    """1 + `extra` where the bool mask `near` is set, 1 elsewhere (same shape, float)."""
    return 1.0 + extra * near.float()


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


def pyramid_sigmas(sigma: torch.Tensor, levels: tuple[float, ...], block_frames: int, share: float,
                   generator) -> torch.Tensor:  # fmt: skip
    """`sigma` `[B, F]` with a `share` of its rows replaced by what one forward of a pyramid plan
    holds: the last block at the sampler's step s (of `levels`, ending at 0), each earlier block
    `offset` (1 or 2) steps further on, clean once past its commit. So the model sees the partly
    denoised context of the cascade's joint forward, not only committed or independently noised."""
    B, blocks, last = sigma.shape[0], sigma.shape[1] // block_frames, len(levels) - 1
    pick = torch.rand(B, generator=generator) < share
    step = torch.randint(last, (B, 1), generator=generator)
    offset = torch.randint(1, 3, (B, 1), generator=generator)
    behind = torch.arange(blocks - 1, -1, -1)[None, :]  # [1, blocks]: blocks each is behind the last
    rows = torch.tensor(levels)[(step + offset * behind).clamp(max=last)]  # [B, blocks]
    return torch.where(pick[:, None], rows.repeat_interleave(block_frames, dim=1), sigma)


def diffusion_forcing_loss(
    model: WanModel,
    words: VocabEncoder,
    rope: Rope,
    batch: Batch,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    block_frames: int,
    colors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE between predicted and true flow (noise - x0) over the noisy blocks (plus the
    color term with `colors`, see `flow_error`)."""
    latents = batch.latents
    frames = latents.shape[2]
    s = sigma[:, None, :, None, None]
    noisy = (1 - s) * latents + s * noise
    text = model.embed_text(words.states(batch.prompts))  # batch B * blocks: one prompt per block
    flow = model(noisy, sigma, text, LocalView(rope, 0, frames, block_frames, "causal"))
    error = flow_error(flow, noise - latents, colors)  # [B, F, h, w]
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
