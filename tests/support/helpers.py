"""Shared helpers for the tests: tiny models, parity assertions, files in each released layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from engine.config import WanConfig
from engine.models.checkpoints.wan import wan_to_diffusers
from engine.models.random_init import init_random_
from engine.models.rope import Rope
from engine.models.wan import WanModel
from engine.runtime.kv import KVCache

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=32, freq_dim=32)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max-abs tolerance check whose failure message gives max and mean differences."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    max_diff, mean_diff = diff.max().item(), diff.mean().item()
    assert max_diff <= tol, f"{what}: max abs diff {max_diff:.3e} > {tol:.1e} (mean {mean_diff:.3e})"


def tiny_model(seed: int = 0, cfg: WanConfig = TINY) -> WanModel:
    model = WanModel(cfg)
    init_random_(model, seed)
    # Perturb the norms so that a swapped or dropped norm key cannot go unnoticed.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_cache(
    cfg: WanConfig, grid: tuple[int, int], *, sink: int, ring: int, scratch: int, batch: int = 1, rebase_sink=False
) -> KVCache:
    return KVCache(
        rebase_sink=rebase_sink,
        rope=Rope(cfg, grid),
        layers=cfg.num_layers,
        batch=batch,
        heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        sink_frames=sink,
        ring_frames=ring,
        scratch_frames=scratch,
        dtype=torch.float32,
        device="cpu",
    )


def twin_dimensions(cfg: WanConfig) -> dict:
    """Our config's dimensions as diffusers' Wan-family transformers name them."""
    return dict(
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
    )


def diffusers_twin(cfg: WanConfig) -> WanTransformer3DModel:
    """An empty diffusers WanTransformer3DModel with the same dimensions."""
    return WanTransformer3DModel(**twin_dimensions(cfg), eps=cfg.eps).eval()


# -- files in each released layout ---------------------------------------------------------------


def write_diffusers_folder(model: WanModel, folder: Path, max_shard_size: str | None = None) -> Path:
    """Save through diffusers' own save_pretrained (config.json + safetensors, sharded if asked)."""
    twin = diffusers_twin(model.cfg)
    twin.load_state_dict({wan_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    twin.save_pretrained(str(folder), **kwargs)
    return folder


def write_wan_safetensors(model: WanModel, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_wan_shards(model: WanModel, folder: Path, shards: int = 2) -> Path:
    """Wan-native shards with a `*.safetensors.index.json`, as the 14B repos ship them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(model.state_dict())
    state = model.state_dict()
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_self_forcing_pt(model: WanModel, path: Path, ema: WanModel | None = None) -> Path:
    """A Self-Forcing-style training checkpoint: generator, generator_ema (FSDP names), critic."""
    generator = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    ema_state = (ema or model).state_dict()
    generator_ema = {f"model.{_fsdp_name(k)}": v.clone() for k, v in ema_state.items()}
    critic = {"model.head.head.weight": torch.zeros(3, 3)}
    torch.save({"generator": generator, "generator_ema": generator_ema, "critic": critic}, str(path))
    return path


def _fsdp_name(key: str) -> str:
    # FSDP wraps each transformer block: blocks.0.x -> blocks.0._fsdp_wrapped_module.x
    return re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module.", key)


# -- Wan-native VAE layout (the inverse of diffusers' convert_wan_vae_to_diffusers) ---------------

_RESNET_PARTS = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
    "conv2": "residual.6",
}


def _native_resnet(rest: str) -> str:
    for diffusers_part, native_part in _RESNET_PARTS.items():
        if rest.startswith(diffusers_part):
            return native_part + rest[len(diffusers_part) :]
    return rest.replace("conv_shortcut", "shortcut")


def vae_key_to_native(key: str) -> str:
    """diffusers AutoencoderKLWan key -> Wan2.1_VAE.pth key (real architecture: 2 res blocks/level)."""
    fixed = {
        "quant_conv": "conv1",
        "post_quant_conv": "conv2",
        "encoder.conv_in": "encoder.conv1",
        "decoder.conv_in": "decoder.conv1",
        "encoder.norm_out": "encoder.head.0",
        "decoder.norm_out": "decoder.head.0",
        "encoder.conv_out": "encoder.head.2",
        "decoder.conv_out": "decoder.head.2",
    }
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_native_resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
        return f"encoder.downsamples.{m[1]}.{_native_resnet(m[2])}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_native_resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(key)
