"""Where a run's weights come from: the paths the flags give, the weights shipped in the package.

Near the bottom of the engine (config and devices only): commands, the demo's trainer and the
loaders share these names without importing any loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import Preset
from engine.devices import SetupError


@dataclass(frozen=True, kw_only=True)
class WeightPaths:
    """Where the weights come from. Presets with `random_init` need none of them."""

    checkpoint: Path | None = None
    """Transformer weights: any layout `engine.models.checkpoints.wan` reads."""
    base: Path | None = None
    """A Wan2.1 diffusers folder providing text_encoder/, tokenizer/, vae/ (and transformer/)."""
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    lora: Path | None = None
    lora_alpha: float | None = None
    ema: bool | None = None
    special_tokens: Path | None = None
    """MAGI-1's special_tokens.npz (from its code repository's example/assets/)."""
    random: bool = False
    """Seeded random weights for every part (timing runs, smoke tests)."""
    seed: int = 0

    @classmethod
    def bundle(cls, folder: Path) -> WeightPaths:
        """Every part from one folder laid out like the shipped weights (`BUNDLED_FILES`)."""
        if not folder.is_dir():
            files = ", ".join(BUNDLED_FILES.values())
            raise SetupError(f"weights folder {folder}: no such folder (give one that holds {files})")
        parts = {"checkpoint": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
        return cls(**{arg: folder / BUNDLED_FILES[part] for arg, part in parts.items()})

    def resolved(self, part: str, preset: Preset | None = None) -> Path | None:
        """The path for `part`: explicit flag, else --base, else the preset's bundled weights."""
        explicit = {"transformer": self.checkpoint, "text_encoder": self.text_encoder, "vae": self.vae}[part]
        if explicit or self.base:
            return explicit or self.base
        if preset is not None and preset.bundled_weights and part in BUNDLED_FILES:
            return bundled_weights_dir(preset.bundled_weights) / BUNDLED_FILES[part]
        return None


BUNDLED_FILES = {
    "transformer": "transformer.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "vae": "latent_codec.safetensors",
}


PATH_FLAGS = {
    "checkpoint": "--checkpoint",
    "base": "--base",
    "text_encoder": "--text-encoder",
    "tokenizer": "--tokenizer",
    "vae": "--vae",
    "lora": "--lora",
    "special_tokens": "--special-tokens",
}


def check_paths(weights: WeightPaths) -> None:
    """Every path given must exist: said before anything loads, not after the transformer has."""
    for field, flag in PATH_FLAGS.items():
        path = getattr(weights, field)
        if path is not None and not Path(path).exists():
            raise SetupError(f"{flag} {path}: no such file or folder")


def bundled_weights_dir(name: str) -> Path:
    """Weights shipped inside the package (engine/weights/<name>)."""
    return Path(__file__).resolve().parent / "weights" / name
