"""Wan's own VAE files (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`) in diffusers' `AutoencoderKLWan` names.

Wan2.1's layout is converted by diffusers' own `convert_wan_vae_to_diffusers`. Wan2.2's VAE (the
48-channel one of Wan2.2-TI2V-5B) nests its levels one step deeper, which that function does not
know (diffusers converts it only in a repository script); the names map as follows:
* `{encoder,decoder}.conv1` / `.head.{0,2}` / `.middle.{0,1,2}` and the top-level `conv1`/`conv2`
  as in Wan2.1 (conv_in, norm_out/conv_out, mid_block, quant_conv/post_quant_conv);
* `encoder.downsamples.L.downsamples.J.residual.{0,2,3,6}` (and `.shortcut`) ->
  `encoder.down_blocks.L.resnets.J.{norm1,conv1,norm2,conv2}` (`.conv_shortcut`); the level's last
  entry, a `Resample` (`.resample.1`, `.time_conv`), -> `encoder.down_blocks.L.downsampler.*`;
* `decoder.upsamples.L.upsamples.J.*` likewise -> `decoder.up_blocks.L.resnets.J.*` and
  `decoder.up_blocks.L.upsampler.*`.
The level shortcuts (`avg_shortcut`: average-pool / duplicate) have no parameters.
"""

from __future__ import annotations

import re

import torch

_RESIDUAL_PARTS = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
                   "shortcut.": "conv_shortcut."}  # fmt: skip
_FIXED = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
          "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
          "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
          "decoder.head.2.": "decoder.conv_out.", "encoder.middle.1.": "encoder.mid_block.attentions.0.",
          "decoder.middle.1.": "decoder.mid_block.attentions.0."}  # fmt: skip
_MIDDLE = re.compile(r"^(encoder|decoder)\.middle\.([02])\.(.*)$")
_LEVEL = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.*)$")
_LEVEL_NAMES = {"encoder.downsamples": ("encoder.down_blocks", "downsampler"),
                "decoder.upsamples": ("decoder.up_blocks", "upsampler")}  # fmt: skip


def is_wan22_layout(keys) -> bool:
    """Wan2.2's nested levels (`decoder.upsamples.0.upsamples.0...`)."""
    return any(k.startswith("decoder.upsamples.0.upsamples.") for k in keys)


def is_wan_native_layout(keys) -> bool:
    """Either of Wan's own layouts (diffusers' names start `decoder.up_blocks`)."""
    return any(k.startswith("decoder.upsamples.") for k in keys)


def _residual(rest: str) -> str:
    for native, ours in _RESIDUAL_PARTS.items():
        if rest.startswith(native):
            return ours + rest[len(native) :]
    return rest


def wan22_vae_key(key: str) -> str:
    """One Wan2.2_VAE.pth key in diffusers' names; keys it does not know pass through (and are
    then reported as unexpected by the loader's fit check)."""
    if m := _LEVEL.match(key):
        blocks, resample = _LEVEL_NAMES[m[1]]
        rest = m[4]
        if rest.startswith(("resample.", "time_conv.")):
            return f"{blocks}.{m[2]}.{resample}.{rest}"
        return f"{blocks}.{m[2]}.resnets.{m[3]}.{_residual(rest)}"
    if m := _MIDDLE.match(key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{_residual(m[3])}"
    for native, ours in _FIXED.items():
        if key.startswith(native):
            return ours + key[len(native) :]
    return key


def vae_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE state dict in either of Wan's layouts, or already in diffusers' names, as diffusers names it."""
    if is_wan22_layout(state):
        return {wan22_vae_key(k): v for k, v in state.items()}
    if is_wan_native_layout(state):
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        return convert_wan_vae_to_diffusers(state)
    return state
