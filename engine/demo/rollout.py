"""Training on the model's own rollouts: a pool of long-running streams the model generates itself.

Each of B streams holds what inference would hold for it: the committed K/V of its last two
blocks (the 9-frame window minus the block being made), written by a commit pass at sigma 0 over
the model's own x0 prediction. A training step advances every stream by one block exactly as the
sampler does (Self-Forcing's 4 steps: x0 prediction, re-noise with fresh noise; then the commit
pass), and trains the same block against the ground truth continued from what the stream shows
(`engine.demo.continuation`). So the model learns to make a good next block from its own,
slightly wrong context, at every horizon up to the stream's length: streams end after a random
number of blocks (far past the window's evictions) and start again.

The noisy input of the trained block is, per stream, either the ground truth noised to one of
the sampler's levels or the sampler's own input at that level (its re-noised x0 prediction of the
step before); the target is the ground truth in both cases.

Keys are kept un-rotated and rotated at window-relative positions (context frames 0..5, the block
6..8): RoPE depends only on distances, so this equals inference at any absolute position, and
streams of different ages share one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.demo.continuation import Scene, read_background, reanchor, render_block, start_scene, switch_scene
from engine.demo.pixels import PatchCodec
from engine.demo.scenes import render
from engine.demo.training import SWITCH_SPAN, flow_error
from engine.models.rope import Rope
from engine.models.wan import WanModel


class RolloutView:
    """An attention view (engine.models.attention): a block of `F` frames attending to each
    stream's committed context and to itself.

    keys/values: per layer `[B, C*T, H, Dh]` un-rotated, C context frames; visible `[B, C]` bool
    (a young stream has fewer committed frames). With `record`, the block's own K/V per layer are
    kept in `recorded` (what a commit pass writes)."""

    def __init__(self, rope: Rope, keys: list, values: list, visible: torch.Tensor, block_frames: int, record=False):
        context = visible.shape[1]
        self.rope, self.rotation = rope, rope.tables(context, block_frames)  # the block follows its context
        T = rope.tokens_per_frame
        to_context = rope.tables(0, context)
        self.keys = [rope.apply(k, to_context) for k in keys]  # rotated once, reused by every layer call
        self.values = values
        own = torch.ones(visible.shape[0], block_frames * T, dtype=torch.bool, device=visible.device)
        row = torch.cat([visible.repeat_interleave(T, dim=1), own], dim=1)  # [B, M]
        self.mask = row[:, None, None, :]  # [B, 1, 1, M]: broadcast over heads and queries
        self.record = record
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.record:
            self.recorded.append((k.detach().float(), v.detach().float()))
        keys = torch.cat([self.keys[layer].to(q.dtype), self.rope.apply(k, self.rotation).to(q.dtype)], dim=1)
        values = torch.cat([self.values[layer].to(v.dtype), v], dim=1)
        return self.rope.apply(q, self.rotation), keys, values, self.mask

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return out


@dataclass
class RolloutConfig:
    streams: int
    min_blocks: int
    max_blocks: int
    own_start: float
    """Share of streams that start with no context (the model makes block 0 and picks the background)."""
    own_input: float
    """Share of trained blocks whose noisy input is the sampler's own, not noised ground truth."""
    switch: float
    """Per-block probability of a prompt switch in a stream that has started."""
    prefix_blocks: int = 1
    """Ground-truth blocks committed first to a stream the model does not start (a clip it continues)."""


class RolloutPool:
    """B streams' committed context and ground-truth scenes; everything in it is saved for a resume."""

    def __init__(self, cfg: RolloutConfig, model: WanModel, codec: PatchCodec, size: int, block_frames: int,
                 context_frames: int, rope: Rope):  # fmt: skip
        self.cfg, self.codec, self.size, self.block = cfg, codec, size, block_frames
        self.rope = rope
        c, T = model.cfg, rope.tokens_per_frame
        shape = (c.num_layers, cfg.streams, context_frames * T, c.num_heads, c.dim // c.num_heads)
        self.keys = torch.zeros(shape, device=rope.device)
        self.values = torch.zeros(shape, device=rope.device)
        self.visible = torch.zeros(cfg.streams, context_frames, dtype=torch.bool, device=rope.device)
        self.scenes: list[Scene | None] = [None] * cfg.streams
        self.age = [0] * cfg.streams  # blocks committed since the stream started
        self.length = [0] * cfg.streams
        self.pick_background = [False] * cfg.streams
        self.since_switch = [SWITCH_SPAN] * cfg.streams  # blocks since the stream's last prompt switch

    def state_dict(self) -> dict:
        names = ("keys", "values", "visible", "scenes", "age", "length", "pick_background", "since_switch")
        return {n: getattr(self, n) for n in names}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(self.rope.device) if torch.is_tensor(value) else value)

    def view(self, streams: list[int] | None = None, record=False) -> RolloutView:
        pick = slice(None) if streams is None else streams
        keys = [k[pick] for k in self.keys]
        values = [v[pick] for v in self.values]
        return RolloutView(self.rope, keys, values, self.visible[pick], self.block, record)

    def start(self, stream: int, rng: np.random.Generator, commit) -> None:
        """A new stream: no context (its first block will be the model's), or a ground-truth first
        block committed by `commit(latents [1, C, F, h, w], prompt, stream)`."""
        cfg = self.cfg
        self.visible[stream] = False
        self.age[stream] = 0
        self.length[stream] = int(rng.integers(cfg.min_blocks, cfg.max_blocks + 1))
        own = bool(rng.random() < cfg.own_start)
        self.pick_background[stream] = own
        self.since_switch[stream] = SWITCH_SPAN
        scene = start_scene(rng, self.size, centred=own or bool(rng.random() < 0.4))
        for _ in range(0 if own else cfg.prefix_blocks):
            frames, scene = render_block(scene, self.block, self.size)
            commit(self.codec.encode(frames[None], self.rope.device), scene.desc.prompt, stream)
        self.scenes[stream] = scene

    def targets(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str], list[Scene]]:
        """Per stream, the next block's ground truth `[B, F, H, W, 3]` uint8, the frame before it
        (where the shape was) `[B, H, W, 3]`, the prompts and the scenes after the block.
        A stream that has started may switch prompt here."""
        truth, before, prompts, after = [], [], [], []
        for i, scene in enumerate(self.scenes):
            if self.age[i] > 0 and rng.random() < self.cfg.switch:
                scene = self.scenes[i] = switch_scene(scene, rng)
                self.since_switch[i] = 0
            before.append(render(scene.desc, tuple(scene.position), scene.radius, scene.background, self.size))
            frames, next_scene = render_block(scene, self.block, self.size)
            truth.append(frames)
            prompts.append(scene.desc.prompt)
            after.append(next_scene)
        return np.stack(truth), np.stack(before), prompts, after

    def append(self, stream_keys: list, stream_values: list, streams: list[int]) -> None:
        """Commit a block's K/V (per layer `[len(streams), F*T, H, Dh]`) to these streams,
        evicting their oldest block."""
        n = stream_keys[0].shape[1]
        for layer, (k, v) in enumerate(zip(stream_keys, stream_values)):
            self.keys[layer, streams] = torch.cat([self.keys[layer, streams, n:], k], dim=1)
            self.values[layer, streams] = torch.cat([self.values[layer, streams, n:], v], dim=1)
        shown = torch.ones(len(streams), self.block, dtype=torch.bool, device=self.visible.device)
        self.visible[streams] = torch.cat([self.visible[streams, self.block :], shown], dim=1)

    def switch_boost(self, extra: float) -> torch.Tensor:
        """`[B]`: 1 + `extra` for streams whose block (the one `targets` gave) is within SWITCH_SPAN
        blocks of a prompt switch, 1 for the others."""
        near = torch.tensor([s < SWITCH_SPAN for s in self.since_switch], dtype=torch.float32)
        return 1.0 + extra * near

    def advance(self, generated: np.ndarray, after: list[Scene]) -> list[int]:
        """After each stream's block `[B, F, H, W, 3]` uint8 is committed: re-anchor its scene to
        what it shows; returns the streams that ended (to be started again)."""
        ended = []
        for i, scene in enumerate(after):
            if self.pick_background[i] and self.age[i] == 0:
                scene = Scene(scene.desc, scene.radius, read_background(generated[i]), scene.position, scene.velocity)
            self.scenes[i] = reanchor(scene, generated[i, -1])
            self.age[i] += 1
            self.since_switch[i] += 1
            if self.age[i] >= self.length[i]:
                ended.append(i)
        return ended


@torch.no_grad()
def sample_block(model: WanModel, text, pool: RolloutPool, sigmas: tuple[float, ...], generator, shape: tuple):
    """Every stream's next block as inference makes it: x0 prediction and re-noising with fresh
    noise at each level of `sigmas` (ending at 0), then the commit pass at sigma 0.

    shape: `[B, C, F, h, w]`. Returns the block's x0, the sampler's input at each level (a list of
    `[B, C, F, h, w]`) and the commit pass's K/V per layer."""
    device = pool.rope.device
    B, _, F = shape[:3]
    view, x, inputs = pool.view(), torch.randn(shape, generator=generator).to(device), []
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        inputs.append(x)
        x0 = x - sigma * model(x, torch.full((B, F), sigma, device=device), text, view)
        if following > 0:  # re-noise the x0 prediction to the next level with fresh noise
            x0 = (1 - following) * x0 + following * torch.randn(shape, generator=generator).to(device)
        x = x0
    commit = pool.view(record=True)
    model(x, torch.zeros(B, F, device=device), text, commit)
    return x, inputs, commit.recorded


@torch.no_grad()
def refined(model: WanModel, text, view: RolloutView, x: torch.Tensor, sigma: torch.Tensor, ladder, generator):
    """What the model's own many-step sampler makes of each stream's block x `[B, C, F, h, w]` at
    level sigma `[B]`: x0 prediction, then re-noise and predict again at each level of `ladder`
    (descending, ending at 0) below sigma, as inference does with that ladder.

    A target for the few-step sampler's x0 prediction (distillation from its own long sampler):
    it keeps what x already commits to, such as where the shape is, and is sharp there, where the
    ground truth, when x has drifted from it, can only be matched on average (a blur, or two copies)."""
    levels, current = torch.tensor(ladder, device=x.device), sigma.clone()
    B, F = x.shape[0], x.shape[2]
    x0 = x - sigma[:, None, None, None, None] * model(x, current[:, None].expand(B, F).contiguous(), text, view).float()
    while True:
        following = torch.where(levels[None, :] < current[:, None], levels[None, :], 0.0).max(dim=1).values  # [B]
        if not bool((following > 0).any()):
            return x0
        f5 = following[:, None, None, None, None]
        x = (1 - f5) * x0 + f5 * torch.randn(x0.shape, generator=generator).to(x0.device)
        again = x - f5 * model(x, following[:, None].expand(B, F).contiguous(), text, view).float()
        x0 = torch.where(f5 > 0, again, x0)  # streams past the ladder's end keep theirs
        current = following


def rollout_loss(model: WanModel, text, pool: RolloutPool, truth: torch.Tensor, inputs: list, weights: torch.Tensor,
                 sigmas: tuple[float, ...], generator, colors: torch.Tensor | None = None,
                 teacher: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """Weighted flow MSE of each stream's block against the ground truth `truth` `[B, C, F, h, w]`,
    at one of the sampler's levels per stream; the input is the noised truth or, with the pool's
    `own_input` share, the sampler's own input at that level. weights: `[B, F, h, w]`; `colors`:
    the color term of `engine.demo.training.flow_error`. With `teacher` (teach, share, where), that
    share of the streams is trained toward `teach(x, sigma)` (`refined` by a teacher) instead of the
    truth, on the latent pixels `where` `[B, 1, F, h, w]` holds (the truth elsewhere)."""
    B, _, F = truth.shape[:3]
    device = truth.device
    levels = torch.randint(len(inputs), (B,), generator=generator)
    own = (torch.rand(B, generator=generator) < pool.cfg.own_input).to(device)
    noise = torch.randn(truth.shape, generator=generator).to(device)
    s = torch.tensor(sigmas[:-1], device=device)[levels.to(device)]  # [B]
    s5 = s[:, None, None, None, None]
    sampled = torch.stack(inputs)[levels.to(device), torch.arange(B, device=device)]
    x = torch.where(own[:, None, None, None, None], sampled, (1 - s5) * truth + s5 * noise)
    if teacher is not None:
        teach, share, where = teacher
        distil = (torch.rand(B, generator=generator) < share).to(device)[:, None, None, None, None]
        truth = torch.where(distil & where, teach(x, s), truth)
    flow = model(x, s[:, None].expand(B, F).contiguous(), text, pool.view())
    error = flow_error(flow, (x - truth) / s5, colors)  # [B, F, h, w]
    return (error * weights).sum() / weights.sum()
