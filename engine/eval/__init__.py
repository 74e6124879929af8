"""Measuring generated video: fidelity against a reference run, prompt adherence and long-horizon
quality of demo videos.

May import: engine.demo and below. Main entry points: `metrics` (PSNR, SSIM),
`adherence.adherence`, `horizons`.
"""
