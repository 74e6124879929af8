"""The demo's latent space: principal components of p x p pixel patches (a linear autoencoder).

Raw patches are a poor latent for a narrow transformer: a 2 x 2 token of 4 x 4 RGB patches holds
192 values, more than the model's width, and at full noise the model must pass all of them
through. Keeping the first k principal components of the patches (fitted in closed form on
training clips) gives k channels per latent pixel (16, like Wan's VAE) at 37 dB on the demo's
clips; each channel is normalised to unit variance. `PatchDecoder` has the streaming decoder's
interface (reset / decode), so the engine treats it like the Wan VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.models.checkpoints.wan import CheckpointError

CODEC_KEYS = ("patch_mean", "basis", "latent_mean", "latent_std")


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """`[B, 3, F, H, W]` -> `[B, 3 p^2, F, H/p, W/p]`, channels ordered (rgb, row, column)."""
    B, C, F, H, W = pixels.shape
    x = pixels.reshape(B, C, F, H // patch, patch, W // patch, patch)
    return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(B, C * patch * patch, F, H // patch, W // patch)


def unpatchify(patches: torch.Tensor, patch: int) -> torch.Tensor:
    B, C, F, h, w = patches.shape
    x = patches.reshape(B, C // (patch * patch), patch, patch, F, h, w)
    return x.permute(0, 1, 4, 5, 2, 6, 3).reshape(B, C // (patch * patch), F, h * patch, w * patch)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` or `[B, F, H, W, 3]` -> float `[B, 3, F, H, W]` in [-1, 1]."""
    video = torch.from_numpy(np.asarray(frames))
    if video.dim() == 4:
        video = video[None]
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


class PatchCodec:
    """latent = (basis (patch - patch_mean) - latent_mean) / latent_std, per latent pixel."""

    def __init__(self, patch: int, tensors: dict[str, torch.Tensor]):
        self.patch = patch
        self.patch_mean = tensors["patch_mean"].float()  # [3 p^2]
        self.basis = tensors["basis"].float()  # [k, 3 p^2], orthonormal rows
        self.latent_mean = tensors["latent_mean"].float()  # [k]
        self.latent_std = tensors["latent_std"].float()  # [k]

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def fit(cls, frames: np.ndarray, patch: int, channels: int) -> PatchCodec:
        """PCA of the patches of `frames` (uint8 `[..., H, W, 3]`)."""
        patches = patchify(to_pixels(frames.reshape(-1, *frames.shape[-3:])), patch)
        rows = patches.permute(0, 2, 3, 4, 1).reshape(-1, patches.shape[1]).double()  # [n, 3 p^2]
        mean = rows.mean(0)
        _, _, v = torch.linalg.svd(rows - mean, full_matrices=False)
        basis = v[:channels]
        latents = (rows - mean) @ basis.T
        tensors = {"patch_mean": mean, "basis": basis, "latent_mean": latents.mean(0), "latent_std": latents.std(0)}
        return cls(patch, {k: t.float() for k, t in tensors.items()})

    @classmethod
    def random(cls, patch: int, channels: int, seed: int) -> PatchCodec:
        """An orthonormal random basis (tests and random-weight runs)."""
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(3 * patch * patch, channels, generator=generator))
        zeros = torch.zeros(3 * patch * patch)
        return cls(patch, {"patch_mean": zeros, "basis": q.T, "latent_mean": torch.zeros(channels),
                           "latent_std": torch.full((channels,), 0.25)})  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, patch: int) -> PatchCodec:
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read the patch codec ({err})") from err
        missing = [k for k in CODEC_KEYS if k not in tensors]
        if missing or tensors.get("basis", torch.zeros(0, 0)).shape[-1] != 3 * patch * patch:
            raise CheckpointError(f"{path}: not a {patch}x{patch} patch codec (missing {missing})")
        return cls(patch, tensors)

    def save(self, path: str | Path) -> None:
        tensors = {k: getattr(self, k).contiguous() for k in CODEC_KEYS}
        save_file(tensors, str(path))

    def encode(self, frames: np.ndarray, device="cpu") -> torch.Tensor:
        """uint8 frames -> latents `[B, k, F, H/p, W/p]`."""
        patches = patchify(to_pixels(frames).to(device), self.patch)
        components = torch.einsum(
            "kc,bcfhw->bkfhw", self.basis.to(device), patches - self._view(self.patch_mean, device)
        )
        return (components - self._view(self.latent_mean, device)) / self._view(self.latent_std, device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents `[B, k, F, h, w]` -> pixels `[B, 3, F, h p, w p]` in [-1, 1]."""
        device = latents.device
        components = latents.float() * self._view(self.latent_std, device) + self._view(self.latent_mean, device)
        patches = torch.einsum("kc,bkfhw->bcfhw", self.basis.to(device), components) + self._view(
            self.patch_mean, device
        )
        return unpatchify(patches, self.patch).clamp(-1.0, 1.0)

    @staticmethod
    def _view(vector: torch.Tensor, device) -> torch.Tensor:
        return vector.to(device).view(1, -1, 1, 1, 1)


class PatchDecoder:
    """The streaming-decoder interface over a `PatchCodec`: each latent frame is one video frame."""

    def __init__(self, codec: PatchCodec):
        self.codec = codec

    def reset(self) -> None:
        """Nothing to forget: every latent frame decodes on its own."""

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` -> latents `[1, k, T, H/p, W/p]` (a stream's given start)."""
        return self.codec.encode(frames, self.codec.basis.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)
