"""Prompts -> cross-attention conditioning, computed once per prompt and kept for recent ones.

The same prompt gives the same object back, so a prompt switch is a change of object (the
recache switch and MAGI-1's guidance rely on it). With classifier-free guidance the prompt is
stacked with the negative prompt along the batch ([cond, uncond]). How encoder states become
K/V is the model family's (`embed`, from engine/families/: Wan's `embed_text`; MAGI-1's caption
K/V beside the model's learned null caption).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from engine.config import Preset
from engine.models.magi import MagiModel, MagiText
from engine.models.text_encoder import PromptEncoder
from engine.models.wan import TextKV, WanModel

KEPT = 8
"""Recent prompts whose K/V are kept (a live stream's viewers switch among a few)."""


class Prompts:
    def __init__(
        self,
        preset: Preset,
        model: WanModel | MagiModel,
        encoder: PromptEncoder,
        device: torch.device,
        embed: Callable[[torch.Tensor], TextKV | MagiText],
    ):
        """`embed`: encoder states `[1, L, text_dim]`, zero past the prompt -> the model's K/V."""
        self.preset, self.model, self.encoder, self.device, self.embed = preset, model, encoder, device, embed
        self._text_kv: OrderedDict[str, TextKV | MagiText] = OrderedDict()
        self._conditioning: OrderedDict[str, TextKV | MagiText] = OrderedDict()

    def text_kv(self, prompt: str) -> TextKV | MagiText:
        """Cross-attention K/V of one prompt."""
        return _kept(self._text_kv, prompt, lambda: self._embed(prompt))

    def _embed(self, prompt: str) -> TextKV | MagiText:
        with torch.no_grad():
            states = self.encoder.encode(prompt).to(self.device)  # [1, L, text_dim], zero past the prompt
            return self.embed(states)

    def conditioning(self, prompt: str) -> TextKV | MagiText:
        """The prompt's K/V; with guidance, stacked with the negative prompt's as batch [cond, uncond]."""
        sampling = self.preset.sampling
        if not sampling.guided:
            return self.text_kv(prompt)
        negative = sampling.negative_prompt
        return _kept(self._conditioning, f"{prompt}\x00{negative}",
                     lambda: TextKV.stack(self.text_kv(prompt), self.text_kv(negative)))  # fmt: skip


def _kept(store: OrderedDict, key: str, make):
    """LRU lookup: the stored value for `key`, made once; at most KEPT entries."""
    if key not in store:
        store[key] = make()
    store.move_to_end(key)
    while len(store) > KEPT:
        store.popitem(last=False)
    return store[key]
