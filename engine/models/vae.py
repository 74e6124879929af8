"""Streaming VAE decode: each committed block becomes pixel frames as soon as it is committed.

diffusers' `AutoencoderKLWan.decode` runs the decoder one latent frame at a time through causal
convolutions that keep the last frames of every layer in a feature cache, but it clears that
cache at the end of each call. Here the cache (`_feat_map`) lives in the decoder object across
calls, so decoding a stream block by block gives exactly the frames of one decode of the whole
latent video: the first latent frame gives 1 frame, every later one `temporal_stride` (4).
`encode` goes the other way for a stream that starts from given frames (diffusers' encode, the
distribution's mode, normalised as the latents the model makes).
diffusers is imported only when a Wan VAE is built or loaded (the demo's codec needs none of it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.config import VaeConfig
from engine.models.checkpoints.wan import CheckpointError, read_safetensors, read_torch
from engine.models.checkpoints.wan_vae import vae_to_diffusers

if TYPE_CHECKING:  # diffusers loads only with a Wan VAE (a second of import time)
    from diffusers import AutoencoderKLWan


def build_vae(cfg: VaeConfig) -> AutoencoderKLWan:
    from diffusers import AutoencoderKLWan

    pixel_channels = 3 * cfg.pixel_patch**2  # Wan2.2 folds 2 x 2 pixels into channels: 12
    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
        is_residual=cfg.is_residual,
        in_channels=pixel_channels,
        out_channels=pixel_channels,
        patch_size=cfg.pixel_patch if cfg.pixel_patch > 1 else None,
        scale_factor_spatial=cfg.spatial_stride,
        scale_factor_temporal=cfg.temporal_stride,
    )


def random_vae(cfg: VaeConfig, seed: int) -> AutoencoderKLWan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vae(cfg).eval()


def place_vae(vae: AutoencoderKLWan, device: torch.device | str, dtype: torch.dtype) -> AutoencoderKLWan:
    """The VAE on `device` with every weight at `dtype` (--vae-dtype). torch's own `to`: diffusers'
    warns of modules to keep in float32 on any dtype cast, and AutoencoderKLWan names none."""
    return torch.nn.Module.to(vae, device, dtype)


def load_vae(cfg: VaeConfig, path: str | Path) -> AutoencoderKLWan:
    """A diffusers `vae/` folder (or pipeline root), or Wan's own `Wan2.1_VAE.pth` /
    `Wan2.2_VAE.pth` / .safetensors."""
    from diffusers import AutoencoderKLWan

    path = _vae_in_folder(Path(path)) if Path(path).is_dir() else Path(path)
    if path.is_dir():
        return _same_variant(AutoencoderKLWan.from_pretrained(str(path)).eval(), cfg, path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such VAE file or folder")
    raw = read_safetensors(path) if path.name.endswith(".safetensors") else read_torch(path)
    state = vae_to_diffusers(raw)
    vae = build_vae(cfg)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: VAE weights do not fit (missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"wrong shapes {mismatched[:8]})"
        )
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def _same_variant(vae: AutoencoderKLWan, cfg: VaeConfig, path: Path) -> AutoencoderKLWan:
    """A folder's own config builds the VAE: refuse one of the other Wan generation (a Wan2.1 VAE
    for a Wan2.2 preset decodes 16 channels, not 48)."""
    found = (vae.config.z_dim, vae.config.patch_size or 1)
    if found != (cfg.z_dim, cfg.pixel_patch):
        raise CheckpointError(
            f"{path}: a VAE with {found[0]} latent channels and pixel patch {found[1]}; the preset needs "
            f"{cfg.z_dim} and {cfg.pixel_patch} (Wan2.1 VAEs have 16 and 1, Wan2.2's 48 and 2)"
        )
    return vae


def _vae_in_folder(folder: Path) -> Path:
    """A diffusers vae/ folder, a pipeline root holding one, or a Wan repo holding Wan2.x_VAE.pth."""
    if (folder / "vae").is_dir():
        folder = folder / "vae"
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKLWan":
        return folder
    native = sorted(folder.glob("*VAE*.pth")) + sorted(folder.glob("*vae*.safetensors"))
    if len(native) == 1:
        return native[0]
    raise CheckpointError(
        f"{folder}: no VAE found (expected a diffusers AutoencoderKLWan folder, a vae/ subfolder or one "
        "Wan2.1_VAE.pth / Wan2.2_VAE.pth)"
    )


class StreamingDecoder:
    """Latent blocks `[B, C, F, h, w]` (normalised) -> pixels `[B, 3, F', H, W]` in [-1, 1]."""

    def __init__(self, vae: AutoencoderKLWan, cfg: VaeConfig):
        self.vae = vae
        mean = cfg.latents_mean or vae.config.latents_mean
        std = cfg.latents_std or vae.config.latents_std
        if len(mean) != vae.config.z_dim or len(std) != vae.config.z_dim:
            raise ValueError(f"latent statistics need {vae.config.z_dim} channels, got {len(mean)}/{len(std)}")
        param = next(vae.parameters())
        self.mean = torch.tensor(mean, dtype=torch.float32, device=param.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1, 1)
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget the causal-convolution cache."""
        self._feat_map: list = [None] * self.vae._cached_conv_counts["decoder"]
        self._frames_seen = 0

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` -> normalised latents `[1, C, 1 + (T - 1) / 4, H / 8, W / 8]`
        (one encode of the whole clip: its first frame gives the first latent frame alone)."""
        param = next(self.vae.parameters())
        pixels = from_uint8(frames).to(param.device, param.dtype)
        z = self.vae.encode(pixels).latent_dist.mode().float()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z = (latents.float() * self.std + self.mean).to(param.dtype)  # undo the latent normalisation
        x = self.vae.post_quant_conv(z)
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                self.vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self._feat_map, feat_idx=[0], first_chunk=self._frames_seen == 0
                )
            )
            self._frames_seen += 1
        out = torch.cat(frames, dim=2)
        if self.vae.config.patch_size is not None:  # Wan2.2: [B, 12, F, H/2, W/2] -> [B, 3, F, H, W]
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.float().clamp(-1.0, 1.0)


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """`[T, H, W, 3]` uint8 -> `[1, 3, T, H, W]` float32 in [-1, 1] (x / 127.5 - 1, as diffusers'
    video processor)."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return pixels.permute(3, 0, 1, 2)[None]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """`[B, 3, F, H, W]` in [-1, 1] -> `[F, H, W, 3]` uint8 of the first batch element."""
    pixels = ((video[0].float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors the ops under it made that are still alive, and their peak: a memory
    profile of code run on the meta device. Views and in-place results (an input returned) make
    no new memory; a made tensor counts until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        inputs = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for made in tree_leaves(out):
            if isinstance(made, torch.Tensor) and id(made) not in inputs:
                nbytes = made.numel() * made.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(made, self._freed, nbytes)
        return out


@functools.lru_cache(maxsize=16)
def decode_on_meta(
    cfg: VaeConfig, block_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> tuple[int, int, int]:
    """(weight bytes, decoder state bytes, decode peak bytes) of a `StreamingDecoder` decoding
    latent blocks of `block_shape` `[B, C, F, h, w]` with its weights at `dtype` (--vae-dtype: the
    cache and activations follow the weights): the Wan VAE built and run on the meta device
    (shapes only, no memory). The state is the causal-convolution cache a stream keeps between
    blocks, after two blocks (its steady size); the peak is what the second block's decode makes
    on top of it (activations, the new cache, the frames). Kept per shape: meta kernels run through
    Python, seconds for the full-size decoder."""
    with torch.device("meta"):
        vae = place_vae(build_vae(cfg).eval(), "meta", dtype)
    weights = sum(t.numel() * t.element_size() for t in (*vae.parameters(), *vae.buffers()))
    stats = dataclasses.replace(cfg, latents_mean=(0.0,) * cfg.z_dim, latents_std=(1.0,) * cfg.z_dim)
    decoder = StreamingDecoder(vae, stats)
    with torch.no_grad(), LiveBytes() as live:
        decoder.decode(torch.zeros(block_shape, device="meta"))
        steady, live.peak = live.live, live.live
        decoder.decode(torch.zeros(block_shape, device="meta"))
    state = sum(t.numel() * t.element_size() for t in decoder._feat_map if isinstance(t, torch.Tensor))
    return weights + decoder.mean.nbytes + decoder.std.nbytes, state, live.peak - steady
