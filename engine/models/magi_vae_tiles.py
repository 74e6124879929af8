"""MAGI-1's VAE over whole videos: the reference's tiling, the streaming decoder, prefix encoding.

Rules of this file (the reference's `TileProcessor` and `video_process.py`, as facts):
- Tiles are `tile_frames` pixel frames long (fps // 2 = 12, no temporal overlap) and `tile_px`
  square (256) with a quarter overlap: tiles start every 192 pixels (24 latents). Each tile goes
  through `MagiVae` alone; a tile's leading overlap is blended linearly with its neighbour
  above / to the left (weight of the new tile i / extent at row i), then every tile is cropped to
  its step and the crops are concatenated.
- Decoding blends each tile with its neighbours' raw decodes. Encoding blends with the
  neighbours' already blended tiles (the reference blends them in place): both are kept here.
- The stream decodes each chunk by itself, as MAGI-1's `post_chunk_process` does: with no temporal
  overlap, chunks that are whole tiles long (6 latent frames = 2 tiles) decode to exactly the
  frames of one tiled decode of the whole video.
- Latents are the encoder's posterior mean x `scale_factor` (0.18215); decoding divides it out.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.models.magi_vae import MagiVae

PREFIX_VIDEO_FRAMES = 32
"""MAGI-1's v2v encodes the first 32 frames of the given clip (`prefix_frame=32`)."""


def _ramp(extent: int, like: torch.Tensor) -> torch.Tensor:
    """The new tile's weights i / extent, computed in float64 and rounded once, as Python floats are."""
    return (torch.arange(extent, dtype=torch.float64) / extent).to(like.dtype).to(like.device)


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """`tile` with its first `extent` entries along `dim` faded in over the last ones of `prev`."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    shape = [1] * tile.dim()
    shape[dim] = extent
    w = _ramp(extent, tile).view(shape)
    head = prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + tile.narrow(dim, 0, extent) * w
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def _starts(size: int, step: int) -> range:
    return range(0, size, step)


def _tiled(x, fn, *, tile: tuple[int, int], step: tuple[int, int], extent: int, keep: tuple[int, int], chained: bool):
    """Run `fn` on every (frames, height, width) tile of `x` `[B, C, T, H, W]` and stitch the results.
    `tile`/`step`: (frames, pixels) of a tile and between tile starts in `x`; `extent`/`keep`:
    the blend extent and the kept (frames, pixels) of each output tile."""
    rows_out = []
    for f in _starts(x.shape[2], step[0]):
        raw, done = {}, {}
        for i in _starts(x.shape[3], step[1]):
            for j in _starts(x.shape[4], step[1]):
                raw[i, j] = out = fn(x[:, :, f : f + tile[0], i : i + tile[1], j : j + tile[1]])
                source = done if chained else raw
                if (i - step[1], j) in raw:
                    out = _blend(source[i - step[1], j], out, extent, dim=3)
                if (i, j - step[1]) in raw:
                    out = _blend(source[i, j - step[1]], out, extent, dim=4)
                done[i, j] = out
        rows = [torch.cat([done[i, j][..., : keep[1], : keep[1]] for j in _starts(x.shape[4], step[1])], dim=4)
                for i in _starts(x.shape[3], step[1])]  # fmt: skip
        rows_out.append(torch.cat(rows, dim=3)[:, :, : keep[0]])
    return torch.cat(rows_out, dim=2)


@torch.no_grad()
def tiled_encode(vae: MagiVae, video: torch.Tensor) -> torch.Tensor:
    """Pixels `[B, 3, T, H, W]` in [-1, 1] -> posterior means `[B, z, T', H/8, W/8]` (unscaled)."""
    cfg = vae.cfg
    tile_latent = cfg.tile_px // cfg.patch_size
    overlap = int(tile_latent * cfg.tile_overlap)
    return _tiled(
        video, vae.encode,
        tile=(cfg.tile_frames, cfg.tile_px), step=(cfg.tile_frames, int(cfg.tile_px * (1 - cfg.tile_overlap))),
        extent=overlap, keep=(cfg.tile_latent_frames, tile_latent - overlap), chained=True,
    )  # fmt: skip


@torch.no_grad()
def tiled_decode(vae: MagiVae, z: torch.Tensor) -> torch.Tensor:
    """Posterior samples `[B, z, t, h, w]` (unscaled) -> pixels `[B, 3, T, 8h, 8w]` (not clamped)."""
    cfg = vae.cfg
    tile_latent, frames = cfg.tile_px // cfg.patch_size, cfg.tile_latent_frames
    overlap = int(cfg.tile_px * cfg.tile_overlap)
    return _tiled(
        z, vae.decode,
        tile=(frames, tile_latent), step=(frames, int(tile_latent * (1 - cfg.tile_overlap))),
        extent=overlap, keep=(cfg.tile_frames, cfg.tile_px - overlap), chained=False,
    )  # fmt: skip


class MagiStreamingDecoder:
    """Latent chunks `[B, z, F, h, w]` (as the DiT makes them) -> pixels `[B, 3, 4F, 8h, 8w]` in
    [-1, 1], one chunk at a time, as MAGI-1 decodes each finished chunk (the runtime's decoder
    interface: `reset()`, `decode(latents)`)."""

    def __init__(self, vae: MagiVae):
        self.vae = vae

    def reset(self) -> None:
        """Nothing to forget: chunks decode independently (no temporal overlap)."""

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` at the stream's size -> latents `[1, z, T / 4, h, w]`."""
        return encode_frames(self.vae, frames)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z = (latents.float() / self.vae.cfg.scale_factor).to(param.dtype)
        return tiled_decode(self.vae, z).float().clamp(-1.0, 1.0)


@torch.no_grad()
def encode_frames(vae: MagiVae, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 frames `[T, H, W, 3]` -> latents `[1, z, T', H/8, W/8]` as the DiT sees them: scaled to
    [-1, 1], tiled-encoded, x scale_factor. T' = T / 4 (a single frame: 1)."""
    pixels = torch.as_tensor(np.asarray(frames))
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    param = next(vae.parameters())
    video = pixels.permute(3, 0, 1, 2)[None].to(param.device, torch.float32) / 127.5 - 1.0  # [1, 3, T, H, W]
    return tiled_encode(vae, video.to(param.dtype)).float() * vae.cfg.scale_factor


def encode_prefix(vae: MagiVae, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An image `[H, W, 3]` or clip `[T, H, W, 3]` (uint8, already at the stream's size) -> the clean
    prefix latents `[1, z, T', H/8, W/8]` exactly as MAGI-1's `process_image` /
    `process_prefix_video` make them: the clip's first 32 frames (an image: one frame, one latent
    frame), encoded by `encode_frames`.

    How MAGI-1 uses them: the first `T' // chunk_width` chunks are committed clean; the rest pad
    the start of the next chunk, which is denoised with them held fixed (an image: 1 latent frame
    of chunk 0, whose 4 decoded frames stay in the video)."""
    pixels = torch.as_tensor(np.asarray(frames))
    clip = pixels[None] if pixels.dim() == 3 else pixels[:PREFIX_VIDEO_FRAMES]
    return encode_frames(vae, clip)


def stretch_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[T, H, W, 3]` scaled to `height` x `width` without keeping the aspect ratio: MAGI-1's
    default ("fit": ffmpeg's scale filter, bicubic); here torch's antialiased bicubic."""
    if frames.shape[1:3] == (height, width):
        return frames
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
