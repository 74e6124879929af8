"""Fidelity of a video against a reference video of the same shape: PSNR and SSIM.

Videos are uint8 `[N, H, W, 3]` (what the decoder emits). SSIM is the standard one (Wang et al.
2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, on luma, averaged over frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PEAK = 255.0


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole video; inf when identical."""
    _check(video, reference)
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)


def _luma(video: np.ndarray) -> torch.Tensor:
    rgb = torch.from_numpy(video.astype(np.float64))  # [N, H, W, 3]
    return (rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))[:, None]  # [N, 1, H, W]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity (1 = identical) on luma; frames smaller than 11 px use their size."""
    _check(video, reference)
    a, b = _luma(video), _luma(reference)
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size)
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())


def _check(video: np.ndarray, reference: np.ndarray) -> None:
    if video.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {video.shape} vs {reference.shape}")
