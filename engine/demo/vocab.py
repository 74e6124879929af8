"""The demo model's text encoder: a learned embedding of each word of a small vocabulary.

Prompts are lower-cased and split on spaces and punctuation; each known word becomes a learned
vector plus a learned position vector, unknown words are dropped with a warning that lists them
(and what the model knows), and states past the prompt are zero, as Wan pads umT5's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.models.checkpoints.wan import CheckpointError
from engine.models.text_encoder import PromptEncoder

log = logging.getLogger(__name__)
_WORD = re.compile(r"[a-z]+")


def ignored_words(prompt: str, vocab: tuple[str, ...], text_len: int) -> list[str]:
    """The words of `prompt` the model does not use: unknown ones, and known ones past `text_len`."""
    words = _WORD.findall(prompt.lower())
    known = [w for w in words if w in vocab]
    return [w for w in words if w not in vocab] + known[text_len:]


class WordEmbedding(nn.Module):
    """ids `[B, L]` (0 = padding) -> states `[B, L, width]`, zero at padding."""

    def __init__(self, vocab_size: int, width: int, text_len: int):
        super().__init__()
        self.words = nn.Embedding(vocab_size + 1, width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(text_len, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states = self.norm(self.words(ids) + self.positions[: ids.shape[1]])
        return states * (ids > 0)[..., None].to(states.dtype)


class VocabEncoder(PromptEncoder):
    """Prompt -> `[B, text_len, width]` states of the known words."""

    def __init__(
        self, vocab: tuple[str, ...], text_len: int, module: WordEmbedding, device: torch.device | str = "cpu"
    ):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {word: i + 1 for i, word in enumerate(self.vocab)}
        self.text_len = text_len
        self.module = module.to(device).eval()
        self.device = torch.device(device)

    @property
    def width(self) -> int:
        return self.module.words.embedding_dim

    @property
    def network(self) -> nn.Module:
        return self.module

    @classmethod
    def create(cls, vocab: tuple[str, ...], text_len: int, width: int, device="cpu") -> VocabEncoder:
        return cls(vocab, text_len, WordEmbedding(len(vocab), width, text_len), device)

    @classmethod
    def load(cls, path: str | Path, vocab: tuple[str, ...], text_len: int, device="cpu") -> VocabEncoder:
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read the word embedding ({err})") from err
        width = state["words.weight"].shape[1] if "words.weight" in state else 0
        module = WordEmbedding(len(vocab), width, text_len)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if {k: tuple(v.shape) for k, v in state.items()} != expected:
            raise CheckpointError(f"{path}: does not fit a {len(vocab)}-word vocabulary of width {width}")
        module.load_state_dict(state)
        return cls(vocab, text_len, module, device)

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(path))

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """`[B, text_len]` ids; warns once per prompt about words the model does not know."""
        rows = []
        for prompt in prompts:
            words = _WORD.findall(prompt.lower())
            unknown = [w for w in words if w not in self.index]
            if unknown:
                log.warning("the demo model does not know %s (ignored); it knows: %s", unknown, " ".join(self.vocab))
            ids = [self.index[w] for w in words if w in self.index][: self.text_len]
            rows.append(ids + [0] * (self.text_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def states(self, prompts: list[str]) -> torch.Tensor:
        """Differentiable states (for training)."""
        return self.module(self.token_ids(prompts))

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        return self.states(prompts).float()
