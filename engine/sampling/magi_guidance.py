"""MAGI-1 in the engine: its chunk window as a plan, its guidance, and its conditioning.

The chunk window (reference §2.3) is the pyramid plan: with S steps and window W, chunk c takes
step s at tick c * S/W + s and commits (its clean K/V pass at clean_t) at the tick after its last
step, in the same forward as the next stage's first step — which is when MAGI-1 prepends the
finished chunk. Up to W chunks denoise at once, plus the one committing. Per-chunk KV ranges
(noise2clean_kvrange 5, 4, 3, 2 by stage; 1 for the clean chunk) become the plan's
`history_reach` / `commit_reach`, which the attention views turn into masks.

Guidance (§2.5), per forward:
* base models, three passes: text + history and null caption + history batched in one forward
  (the null pass's clean K/V are the ones the cache keeps), then every working chunk alone with
  the null caption (no history) as a batch of single chunks;
  flow = (1 - s_prev) alone + (s_prev - s_text) null + s_text text, with the scales of the chunk's
  t bucket;
* distilled models, one pass with the step-size embedding; a chunk in its last stage
  (t >= 0.3) is also run alone with its caption and blended 0.7 / 0.3.
"""

from __future__ import annotations

import bisect

import torch

from engine.config import MagiGuidance as MagiGuidanceConfig
from engine.models.attention import LocalView
from engine.models.magi import CaptionKV, MagiModel, MagiText
from engine.plan.sigmas import TRAIN_TIMESTEPS, Schedule

BUCKET_MARGIN = 1e-7
"""The reference looks buckets up in t_range - 1e-7 (so t = 0.3 falls in the 0.3 bucket)."""
WINDOW = 4
"""Chunks denoising at once (window_size), one per stage of noise2clean_kvrange."""
SHORTCUT_STEPS = 12
SHORTCUT_INTERVALS = (2, 1, 1)
"""12-step shortcut grid: the step-size interval of each local step of a stage ("8,16,16")."""


def chunk_offset(steps: int, window: int) -> int:
    """Ticks between the starts of consecutive chunks: S / W (MAGI-1's denoise_step_per_stage)."""
    if steps % window:
        raise ValueError(f"{steps} steps do not split into a window of {window} chunks")
    return steps // window


def step_size(steps: int, window: int, local_step: int, shortcut: tuple[int, int, int] = (8, 16, 16)) -> float:
    """The distilled model's step-size input d: 2 * S / W, or in the 12-step shortcut grid 8 / interval
    of the local step (4, 8, 8 for "8,16,16"; 8, 8, 4 for "16,16,8")."""
    if steps == SHORTCUT_STEPS:
        intervals = SHORTCUT_INTERVALS if shortcut[0] == 8 else SHORTCUT_INTERVALS[::-1]
        return 4 / intervals[local_step % len(intervals)] * 2
    return steps / window * 2


def magi_text(model: MagiModel, states: torch.Tensor, length: int, null: CaptionKV) -> MagiText:
    """A prompt's conditioning: its caption K/V (`states [1, L, text_dim]`, `length` real tokens)."""
    return MagiText(model.embed_caption(states, (length,)), (False,), null)


class MagiGuidance:
    """MAGI-1's guidance for the executor (engine/guidance.py's protocol)."""

    def __init__(self, cfg: MagiGuidanceConfig, schedule: Schedule, window: int, shortcut=(8, 16, 16)):
        self.cfg, self.schedule, self.window, self.shortcut = cfg, schedule, window, shortcut
        self.branches = 2 if cfg.passes == 3 else 1
        self.per_stage = chunk_offset(schedule.steps, window)
        self.edges = [edge - BUCKET_MARGIN for edge in cfg.t_range]
        self._paired: tuple[MagiText, CaptionKV] | None = None

    def _with_null(self, text: MagiText) -> CaptionKV:
        """[prompt, null caption] along the batch, kept while the prompt stays the same."""
        if self._paired is None or self._paired[0] is not text:
            self._paired = (text, CaptionKV.stack(text.caption, text.null))
        return self._paired[1]

    def _t(self, t_in: float) -> float:
        return 1.0 - t_in / TRAIN_TIMESTEPS

    def _working(self, t_in: float) -> bool:
        return t_in != self.schedule.commit_t

    def _scales(self, t: float) -> tuple[float, float]:
        """(s_prev, s_text) of the bucket t falls in."""
        bucket = min(max(bisect.bisect_left(self.edges, t) - 1, 0), len(self.edges) - 1)
        return self.cfg.prev_chunk_scales[bucket], self.cfg.text_scales[bucket]

    @staticmethod
    def _spans(members):
        """(block, t_in, frame slice) of each member along the forward's frame axis."""
        start = 0
        for block, latents, t_in in members:
            yield block, t_in, slice(start, start + latents.shape[2])
            start += latents.shape[2]

    def _step_sizes(self, executor, members, batch: int, frames: int) -> torch.Tensor | None:
        """`[batch, frames]` step size of this tick (every working chunk is at the same local step)."""
        if not executor.model.cfg.distill:
            return None
        working = [t_in for _, _, t_in in members if self._working(t_in)]
        step = self.schedule.model_t.index(working[0]) if working else 0
        d = step_size(self.schedule.steps, self.window, step % self.per_stage, self.shortcut)
        return torch.full((batch, frames), d, dtype=torch.float64, device=executor.device)

    def __call__(self, executor, members, x, sigma, text: MagiText, view) -> torch.Tensor:
        clean = tuple(not self._working(t_in) for _, latents, t_in in members for _ in range(latents.shape[2]))
        frames = x.shape[2]
        if self.branches == 2:
            both = MagiText(self._with_null(text), (False, True), text.null, clean)
            out = executor.model(torch.cat([x, x]), sigma.expand(2, -1), both, view)
            with_text, with_null = out.chunk(2)
            alone = self._alone(executor, members, MagiText(text.null, (True,), text.null))
            return self._combine(members, with_text, with_null, alone)
        steps = self._step_sizes(executor, members, 1, frames)
        flow = executor.model(x, sigma, text.for_frames(clean), view, step_size=steps)
        return self._nearly_clean(executor, members, flow, text)

    def _alone(self, executor, members, text: MagiText, only: set[int] | None = None) -> dict[int, torch.Tensor]:
        """Working chunks (or `only` those) run each alone, as a batch of single chunks: {block: flow}."""
        chosen = [m for m in members if self._working(m[2]) and (only is None or m[0] in only)]
        if not chosen:
            return {}
        x = torch.cat([latents for _, latents, _ in chosen])  # [n, C, F_b, H, W]
        sigma = torch.cat([executor.sigma([m]) for m in chosen])  # [n, F_b]
        block_frames = x.shape[2]
        # RoPE is relative and each chunk sees only itself: every chunk can sit at frame 0
        view = LocalView(executor.rope, 0, block_frames, block_frames, "causal")
        steps = self._step_sizes(executor, members, x.shape[0], block_frames)
        alone_text = MagiText(text.caption, text.dropped, text.null, (False,) * block_frames)
        flow = executor.model(x, sigma, alone_text, view, step_size=steps)
        return {block: flow[i : i + 1] for i, (block, _, _) in enumerate(chosen)}

    def _combine(self, members, with_text, with_null, alone: dict[int, torch.Tensor]) -> torch.Tensor:
        parts = []
        for block, t_in, span in self._spans(members):
            if block not in alone:  # committing: its flow is not used
                parts.append(with_null[:, :, span])
                continue
            s_prev, s_text = self._scales(self._t(t_in))
            parts.append(
                (1 - s_prev) * alone[block] + (s_prev - s_text) * with_null[:, :, span] + s_text * with_text[:, :, span]
            )
        return torch.cat(parts, dim=2)

    def _nearly_clean(self, executor, members, flow: torch.Tensor, text: MagiText) -> torch.Tensor:
        """Distilled models: blend a chunk in its last stage with a pass of it alone (own caption)."""
        threshold = self.cfg.nearly_clean_t
        if threshold is None:
            return flow
        late = {b for b, _, t_in in members if self._working(t_in) and self._t(t_in) >= threshold - BUCKET_MARGIN}
        if not late:
            return flow
        alone, weight = self._alone(executor, members, text, only=late), self.cfg.nearly_clean_weight
        parts = [
            weight * flow[:, :, span] + (1 - weight) * alone[block] if block in late else flow[:, :, span]
            for block, _, span in self._spans(members)
        ]
        return torch.cat(parts, dim=2)
