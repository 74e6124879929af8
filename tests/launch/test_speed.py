"""The one-device speed benchmark runs the real path on a CPU (GPU numbers need a GPU).

pytest tests/launch/test_speed.py
"""

import pytest
import torch

from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.benchmarks.speed import matmul_peak_tflops, measure, time_split


def test_speed_benchmark_on_cpu():
    device = torch.device("cpu")
    with torch.no_grad():
        session, row = measure("tiny-wan", device, torch.float32, WeightPaths(), warmup=1, blocks=2)
        shares = time_split(session, device)
    assert row["fps"] > 0 and row["forward_ms"] > 0 and row["tflops"] > 0
    cache = session.executors(NoiseSource(0), blocks_in_forward=1).cache  # the same shape as the run's
    assert row["kv_gib"] == pytest.approx(cache.nbytes / 2**30)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["attention"] > 0 and shares["linear"] > 0, shares
    assert 0 < matmul_peak_tflops(device, torch.float32, size=256, repeats=2) < 100
