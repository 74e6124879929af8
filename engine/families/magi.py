"""The MAGI-1 family: MAGI-1's DiT (4.5B, 24B; base and distilled), its released weights, its
caption K/V with special tokens and a learned null caption, its learned rotary bands, and how
given frames become the clean chunks a stream starts from (its transformer VAE's prefix encoding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.config import MagiConfig, Preset
from engine.devices import SetupError
from engine.families.base import Family, TextEmbedding
from engine.models.checkpoints.wan import load_opened
from engine.models.flops import magi_forward_flops
from engine.models.magi import CaptionKV, LayerNorm1p, MagiModel, MagiText, initial_bands
from engine.models.magi_rope import MagiRope
from engine.models.magi_tokens import SpecialTokens
from engine.models.magi_vae_tiles import PREFIX_VIDEO_FRAMES, stretch_frames
from engine.models.random_init import init_random_
from engine.sampling.magi_guidance import magi_text
from engine.weight_paths import WeightPaths


class Magi(Family):
    name = "magi"
    tiny_preset = "magi-1-tiny"
    stand_in_keeps = ("distill",)
    signals = frozenset({"embedded"})

    def new_model(self, cfg: MagiConfig) -> MagiModel:
        return MagiModel(cfg)

    def init_random_(self, model: MagiModel, seed: int) -> None:
        init_magi_random_(model, seed)

    def load_checkpoint(self, model: MagiModel, preset: Preset, weights: WeightPaths, path: Path, *, device, edit=None):
        """MAGI-1 weights; a folder with several `inference_weight*` variants gives the preset's."""
        from engine.models.checkpoints.magi import open_magi_checkpoint

        variant = None
        if path.is_dir() and len(list(path.glob("inference_weight*"))) > 1:
            variant = "inference_weight.distill" if preset.model.distill else "inference_weight"
        ckpt = open_magi_checkpoint(path, variant)
        folder = ckpt.files[0].parent.name  # the released folders say which kind they hold
        distilled = ".distill" in folder
        if folder.startswith("inference_weight") and distilled != preset.model.distill:
            kind = "distilled" if distilled else "base"
            raise SetupError(f"{ckpt.source} holds {kind} MAGI-1 weights but preset {preset.name} is not {kind}")
        return load_opened(model, ckpt, device=device, dtypes="model", edit=edit)

    def rope(self, preset: Preset, grid: tuple[int, int], device, model: MagiModel | None = None) -> MagiRope:
        """From the model's learned bands (without a model, e.g. to size a cache, their initial values)."""
        bands = model.rope.bands if model is not None else initial_bands(preset.model.rope_bands)
        return MagiRope(bands, grid, device)

    def text_embedding(self, preset: Preset, model: MagiModel, special: SpecialTokens | None) -> TextEmbedding:
        return MagiCaption(preset, model, special)

    def forward_flops(self, cfg: MagiConfig, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
        return magi_forward_flops(cfg, query_tokens, key_tokens, text_tokens)

    def kv_commit_from(self, branches: int) -> int | None:
        """With two guidance passes, the null-caption pass writes the clean K/V both passes read."""
        return 1 if branches == 2 else None

    def encode_start(self, preset: Preset, decoder, frames: np.ndarray, latent_frames: int) -> torch.Tensor:
        """Given frames `[T, H, W, 3]` uint8 (any size; an image: T = 1) -> clean latents
        `[1, C, P * F, h, w]`: whole chunks, P >= 1, at most `latent_frames`, by MAGI-1's VAE
        (`decoder`: the session's MagiStreamingDecoder).

        As MAGI-1's v2v: the clip stretched to the stream's size, its first 32 frames, encoded in
        12-frame tiles; a stream keeps only whole chunks of them (MAGI-1 also holds the 2 latent
        frames past the last whole chunk fixed at the start of the next chunk; the block plan has no
        partial blocks). An image, or a clip shorter than a chunk, is held on its first frame to
        make one chunk (MAGI-1's i2v instead pins the image's single latent frame)."""
        stream = preset.stream
        chunk = stream.frames_per_block
        clip = stretch_frames(np.asarray(frames), stream.height, stream.width)[:PREFIX_VIDEO_FRAMES]
        stride = preset.vae.temporal_stride
        chunks = max(1, min(len(clip) // stride, latent_frames) // chunk)
        needed = chunks * chunk * stride
        if len(clip) < needed:
            clip = np.concatenate([np.repeat(clip[:1], needed - len(clip), axis=0), clip])
        return decoder.encode(clip[:needed]).float()


class MagiCaption:
    """A prompt's caption K/V: its real tokens (special tokens prepended when the preset has
    them) beside the model's learned null caption, made once per model."""

    def __init__(self, preset: Preset, model: MagiModel, special: SpecialTokens | None):
        self.preset, self.model, self.special = preset, model, special
        self._null_caption: CaptionKV | None = None

    def __call__(self, states: torch.Tensor) -> MagiText:
        if self._null_caption is None:
            self._null_caption = self.model.null_caption()
        length = max(int((states[0].abs().sum(-1) > 0).sum()), 1)  # real tokens (once per prompt)
        if self.special is not None:
            states, length = self.special.prepend(states, length, self.preset.text.special_tokens)
        return magi_text(self.model, states, length, self._null_caption)


@torch.no_grad()
def init_magi_random_(model: MagiModel, seed: int) -> None:
    """Seeded MAGI-1 weights: linears U(+-1/sqrt(fan_in)); plain LayerNorms 1 / 0; the "1p"
    norms store weight - 1, so 0; rotary bands at their initial 10000^(-i/16)."""
    init_random_(model, seed)
    for name, param in model.named_parameters():
        if isinstance(_owner(model, name), LayerNorm1p) and name.endswith("weight"):
            param.zero_()
        elif name == "rope.bands":
            param.copy_(initial_bands(param.shape[0]))


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


MAGI = Magi()
