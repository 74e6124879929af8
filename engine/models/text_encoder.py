"""Prompt -> text states for cross-attention: umT5 through transformers, with a prompt cache.

transformers is imported only when a umT5 is built (from a folder or seeded random): importing
it takes seconds, and the demo's presets encode prompts without it (engine/demo/vocab.py).

Wan conditions on umT5-XXL hidden states of the prompt, zero beyond the prompt's own tokens and
padded to `text_len` (512) tokens; cross-attention then attends to all of them. Real encoders load
from a local transformers folder (Wan2.1 diffusers layout: `text_encoder/` + `tokenizer/`); tests
and tiny presets build a seeded random umT5 with a byte-level tokenizer, which needs no files.
"""

from __future__ import annotations

import html
import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import TinyTextEncoder
from engine.models.checkpoints.validate import check_file_dtypes, check_tensors

if TYPE_CHECKING:  # transformers loads only with a real or random umT5 (seconds of import time)
    from transformers import T5EncoderModel, UMT5EncoderModel

CACHED_PROMPTS = 64


def clean_prompt(prompt: str) -> str:
    """Unescape HTML entities and collapse whitespace, as Wan's pipelines do before tokenising."""
    return " ".join(html.unescape(html.unescape(prompt)).split())


def _find_folders(encoder_dir: Path, tokenizer_dir: Path | None) -> tuple[Path, Path]:
    if (encoder_dir / "text_encoder").is_dir():  # a pipeline root
        return encoder_dir / "text_encoder", tokenizer_dir or encoder_dir / "tokenizer"
    if tokenizer_dir is None:
        sibling = encoder_dir.parent / "tokenizer"
        tokenizer_dir = sibling if sibling.is_dir() else encoder_dir
    return encoder_dir, tokenizer_dir


def _check_umt5_folder(folder: Path) -> str:
    """The folder's model_type: umt5 (Wan, SkyReels-V2) or t5 (MAGI-1's T5-XXL)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: not a transformers umT5 folder (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ("umt5", "t5"):
        raise FileNotFoundError(
            f"{folder}: config.json describes model_type={model_type!r}, not a umT5 encoder. Wan's own "
            "models_t5_umt5-xxl-enc-bf16.pth is not supported: use the text_encoder/ and tokenizer/ "
            "folders of Wan2.1-T2V-1.3B-Diffusers (--text-encoder DIR)"
        )
    return model_type


def _load_tokenizer(folder: Path):
    """A local tokenizer folder. transformers would take a missing path for a Hub name and answer
    with a paragraph; say which folder and what it should hold instead."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such tokenizer folder (pass --tokenizer DIR, e.g. the pipeline's tokenizer/)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise FileNotFoundError(
            f"{folder}: not a tokenizer folder (expected tokenizer.json or spiece.model beside its config: {detail})"
        ) from err


class PromptEncoder:
    """Prompts -> `[B, text_len, width]` float32 states, keeping the most recent prompts' states.

    Subclasses give `width`, `network` (the module holding the weights, at `device`) and
    `_encode_uncached(prompts)`. `swap_to(device)` keeps the weights where they are (host memory)
    and copies them to `device` only to encode prompts not seen yet, dropping the copies after:
    the device holds them for one encode, and the cached states stay on the host.
    """

    width: int
    device: torch.device
    network: torch.nn.Module

    def __init__(self) -> None:
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._swap: torch.device | None = None
        self.swaps = 0
        """Encodes that copied the weights to the swap device and back."""

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def swap_to(self, device: torch.device) -> None:
        """Encode on `device` with weights kept at `self.device` (pinned there when copying to CUDA)."""
        self._swap = torch.device(device)
        if self._swap.type == "cuda":
            for t in [*self.network.parameters(), *self.network.buffers()]:
                t.data = t.data.pin_memory()

    def _encode_placed(self, prompts: list[str]) -> torch.Tensor:
        """`_encode_uncached` where the weights are, or on the swap device with copies of them."""
        if self._swap is None:
            return self._encode_uncached(prompts)
        home, tensors = self.device, [*self.network.parameters(), *self.network.buffers()]
        kept = [t.data for t in tensors]
        try:
            for t in tensors:
                t.data = t.data.to(self._swap, non_blocking=True, copy=True)
            self.device = self._swap
            return self._encode_uncached(prompts).to(home)
        finally:
            for t, data in zip(tensors, kept):
                t.data = data
            self.device = home
            self.swaps += 1

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """`[B, text_len, width]` float32 states for one prompt or a batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            for prompt, states in zip(missing, self._encode_placed(missing)):
                self._cache[prompt] = states
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        while len(self._cache) > CACHED_PROMPTS:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[p] for p in prompts])


class TextEncoder(PromptEncoder):
    """umT5 (or MAGI-1's T5) through transformers, zero past each prompt's tokens (as Wan pads)."""

    def __init__(self, tokenizer, encoder: UMT5EncoderModel | T5EncoderModel, text_len: int, device):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.to(device).eval()
        self.text_len = text_len
        self.device = torch.device(device)

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    @property
    def network(self) -> torch.nn.Module:
        return self.encoder

    @classmethod
    def from_folder(
        cls,
        encoder_dir: str | Path,
        *,
        text_len: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        tokenizer_dir: str | Path | None = None,
    ) -> TextEncoder:
        from transformers import T5EncoderModel, UMT5EncoderModel

        enc, tok = _find_folders(Path(encoder_dir), Path(tokenizer_dir) if tokenizer_dir else None)
        kind = T5EncoderModel if _check_umt5_folder(enc) == "t5" else UMT5EncoderModel
        tokenizer = _load_tokenizer(tok)
        check_file_dtypes(enc)  # from_pretrained would cast an int8 tensor to float without a word
        encoder = kind.from_pretrained(str(enc), dtype=dtype)
        check_tensors(encoder.state_dict(), enc)
        return cls(tokenizer, encoder, text_len, device)

    @classmethod
    def random(cls, spec: TinyTextEncoder, *, text_len: int, device: torch.device | str) -> TextEncoder:
        """A seeded random umT5 with a byte-level tokenizer (no files needed)."""
        from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

        tokenizer = ByT5Tokenizer()
        config = UMT5Config(
            vocab_size=len(tokenizer),
            d_model=spec.d_model,
            d_kv=spec.d_kv,
            d_ff=spec.d_ff,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            encoder = UMT5EncoderModel(config)
        return cls(tokenizer, encoder, text_len, device)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.device)
        states = self.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        # Wan zeroes the states past each prompt's real length, then pads to text_len.
        return (states * tokens.attention_mask[..., None].to(states.dtype)).float()
