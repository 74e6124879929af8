"""MAGI-1's VAE weights as released: `ckpt/vae/` of `sand-ai/MAGI-1` holds `config.json`
(`_class_name` ViTVAE, its `ddconfig`) and `diffusion_pytorch_model.safetensors`, whose keys are
the module names of engine/models/magi_vae.py. A .pt / .pth state dict with those keys loads too.

Rules: a folder is searched for that layout (itself, `vae/`, `ckpt/vae/`); a file or folder that is
not it is refused in one line naming what is wrong: a Wan VAE, missing or extra keys, wrong shapes,
a config.json whose sizes differ from the preset's, or bad values (validate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import MagiVaeConfig
from engine.models.checkpoints.validate import CheckpointError, check_file_dtypes, check_tensors
from engine.models.checkpoints.wan import read_safetensors, read_torch
from engine.models.magi_vae import MagiVae

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WAN_VAE_MARKS = ("decoder.upsamples.", "encoder.downsamples.", "decoder.up_blocks.", "encoder.down_blocks.")
# ddconfig field of the released config.json -> our MagiVaeConfig field
DDCONFIG_FIELDS = {
    "embed_dim": "dim", "depth": "num_layers", "num_heads": "num_heads", "z_chans": "z_dim",
    "patch_size": "patch_size", "patch_length": "patch_length", "video_size": "trained_size",
    "video_length": "trained_frames",
}  # fmt: skip


def find_magi_vae(path: Path) -> Path:
    """The weights file in `path` (a file, a `ckpt/vae` folder, or a folder above one)."""
    if path.is_file():
        return path
    for folder in (path, path / "vae", path / "ckpt" / "vae"):
        if (folder / WEIGHTS_FILE).is_file():
            return folder / WEIGHTS_FILE
    raise CheckpointError(
        f"{path}: no MAGI-1 VAE here (expected {WEIGHTS_FILE} in it, in vae/ or in ckpt/vae/, "
        "as sand-ai/MAGI-1 ships it)"
    )


def load_magi_vae(cfg: MagiVaeConfig, path: str | Path) -> MagiVae:
    """MAGI-1's VAE from `path`, checked against `cfg` before any weight is copied."""
    file = find_magi_vae(Path(path))
    _check_config(cfg, file.parent / "config.json")
    if file.name.endswith(".safetensors"):
        check_file_dtypes(file)
        state = read_safetensors(file)
    else:
        state = read_torch(file)
    vae = MagiVae(cfg)
    check_fit(vae, state, file)
    check_tensors(state, file)
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def check_fit(vae: MagiVae, state: dict, source: Path) -> None:
    """One line for the first way `state` is not this VAE's weights."""
    if any(key.startswith(WAN_VAE_MARKS) for key in state):
        raise CheckpointError(
            f"{source}: this is a Wan VAE; MAGI-1 needs its own transformer VAE "
            f"(sand-ai/MAGI-1 ckpt/vae/{WEIGHTS_FILE}): pass --vae with that folder"
        )
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing:
        raise CheckpointError(f"{source}: not MAGI-1's VAE for this preset: missing {_few(missing)}")
    if extra:
        raise CheckpointError(f"{source}: not MAGI-1's VAE for this preset: unexpected keys {_few(extra)}")
    if shapes:
        key = shapes[0]
        raise CheckpointError(
            f"{source}: {key} has shape {tuple(state[key].shape)}, the preset's MAGI-1 VAE needs "
            f"{tuple(expected[key].shape)}{_more(len(shapes) - 1)}"
        )


def _check_config(cfg: MagiVaeConfig, config: Path) -> None:
    """The released config.json's sizes (the ones shapes cannot show, e.g. heads) against `cfg`."""
    if not config.is_file():
        return
    try:
        raw = json.loads(config.read_text())
        ddconfig = raw.get("ddconfig", {})
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{config}: not a readable config.json ({err})") from err
    if raw.get("_class_name", "ViTVAE") != "ViTVAE":
        raise CheckpointError(f"{config}: a {raw.get('_class_name')} config, not MAGI-1's ViTVAE")
    for theirs, ours in DDCONFIG_FIELDS.items():
        if theirs in ddconfig and ddconfig[theirs] != getattr(cfg, ours):
            raise CheckpointError(
                f"{config}: {theirs} is {ddconfig[theirs]}, the preset's MAGI-1 VAE has {getattr(cfg, ours)}"
            )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + _more(len(keys) - 3)


def _more(count: int) -> str:
    return f" (+{count} more)" if count > 0 else ""
