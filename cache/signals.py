"""Indicators the policies decide on, computed from outside the model and only when asked.

* `embedded(block)`: the block's patch-embedded noisy input `[B, N, dim]` (FlowCache on MAGI-1).
* `modulated(block)`: block 0's timestep-modulated self-attention input (TeaCache; FlowCache on
  SkyReels-V2): the embedded input, layer-normed, scaled and shifted by the block's noise level.
* `first_block(block)`: the residual of the first transformer layer on the block's tokens, with
  its real context (committed K/V and the other in-flight blocks' last K/V): FBCache's probe.
  It costs one layer's forward of the block; `probe_flops` counts it.
Each is computed once per block per tick; the first two are identical across guidance branches.
What a network offers is its family's (engine/families/: `Family.signals`, `modulated`,
`first_layer`); the rest of this file reads no model internals.
"""

from __future__ import annotations

import torch

from engine.families import family_of, forward_flops
from engine.plan.sigmas import TRAIN_TIMESTEPS
from engine.runtime.views import InFlightView

SUBSAMPLE = 4
"""Keep every 4th token of stored features: enough for a mean relative change, 4x less memory."""


class Signals:
    """Lazy indicators for one tick. `members`: {block: (input latents, network t)}."""

    def __init__(self, executor, tick_blocks: list[int], members: dict, text, branches: int):
        self.executor, self.blocks, self.members = executor, tick_blocks, members
        self.text, self.branches = text, branches
        self.model = executor.model
        self.family = family_of(self.model.cfg)
        self._memo: dict[tuple[str, int], torch.Tensor] = {}
        self.probe_flops = 0

    def _sigma(self, block: int) -> torch.Tensor:
        latents, t = self.members[block]
        return torch.full((1, latents.shape[2]), t / TRAIN_TIMESTEPS, dtype=torch.float64, device=latents.device)

    def _cached(self, kind: str, block: int, make) -> torch.Tensor:
        if (kind, block) not in self._memo:
            with torch.no_grad():
                self._memo[(kind, block)] = make()
        return self._memo[(kind, block)]

    def embedded(self, block: int) -> torch.Tensor:
        return self._cached("embedded", block, lambda: self.model.embed(self.members[block][0])[:, ::SUBSAMPLE])

    def modulated(self, block: int) -> torch.Tensor:
        def make():
            latents = self.members[block][0]
            return self.family.modulated(self.model, latents, self._sigma(block), self.executor.fps)[:, ::SUBSAMPLE]

        return self._cached("modulated", block, make)

    def first_block(self, block: int) -> torch.Tensor:
        """`[branches, N/SUBSAMPLE, dim]`: layer 0's output minus its input on the block's tokens."""
        return self._cached("first_block", block, lambda: self._probe(block))

    def _probe(self, block: int) -> torch.Tensor:
        ex = self.executor
        latents, _ = self.members[block]
        x = ex.model.embed(latents).expand(self.branches, -1, -1)
        sigma = self._sigma(block).expand(self.branches, -1)
        # its real context: committed frames and the other blocks' last K/V (blocks never run yet left out)
        present = [b for b in self.blocks if b == block or b in ex.inflight]
        fill = lambda layer, _: {b: ex.inflight[b].layer(layer) for b in present if b != block}  # noqa: E731
        view = InFlightView(ex.cache, present, [block], ex.frames_per_block, ex.attention, fill=fill)
        out = self.family.first_layer(ex.model, x, sigma, ex.fps, self.text, view)
        cfg, tokens = ex.model.cfg, x.shape[1]
        one_layer = forward_flops(cfg, tokens, view.end, self.text.keys[0].shape[1]) // cfg.num_layers
        self.probe_flops += one_layer * self.branches
        return (out - x)[:, ::SUBSAMPLE]


class FeatureTap:
    """Per-layer outputs of the transformer blocks during one forward (BWCache's indicator),
    taken with forward hooks so the model stays untouched. `take()` -> list over layers of
    `[B, N/SUBSAMPLE, dim]` for each requested token span."""

    def __init__(self, model):
        self.outputs: list[torch.Tensor] = []
        self.handles = [block.register_forward_hook(self._hook) for block in model.blocks]

    def _hook(self, module, args, output) -> None:
        self.outputs.append(output)

    def take(self, spans: dict[int, slice]) -> dict[int, list[torch.Tensor]]:
        taken = {b: [out[:, span][:, ::SUBSAMPLE].clone() for out in self.outputs] for b, span in spans.items()}
        self.outputs = []
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
