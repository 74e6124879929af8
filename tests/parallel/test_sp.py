"""Ulysses sequence parallelism: sp ranks sharing every forward equal one device, at any degree
that divides the heads, and the entry points run any plan on one sp group.

pytest tests/parallel/test_sp.py

The equality cases run in one launch of tests/support/sp_worker.py under torchrun (gloo, loopback, an
outer timeout): sp 2, 3 and 4 over the first ranks of 4, on tiny models whose token counts mostly
do not divide sp (padded slices cut across frames). Rank 0 saves the latents, compared here with
the same preset on one process (<= 1e-5 at float32). The entry points run as a user runs them.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sp_worker import case_preset
from test_faults import _kill_session, _session_alive, _worker
from websockets.sync.client import connect

from engine.config import ConfigError
from engine.runtime.sharding import Slice, Ulysses
from engine.sampling.noise import NoiseSource
from engine.serving.protocol import decode_frame
from engine.serving.video import read_frames
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.generate import main as generate
from launch.presets import get_preset
from parallel.ulysses import yunchang_available

WORKER = Path(__file__).parents[1] / "support" / "sp_worker.py"
BLOCKS = 5
CASES = [
    "wan12:2:pyramid:1:torch",  # 75 tokens a block: odd counts pad, slices of 1.5 frames
    "wan12:3:sequential:0:torch",  # the sequential plan; 3-frame blocks split at frame boundaries
    "wan12:4:pyramid:1:torch:flowcache:0.5",  # padded, cut across frames, with feature caching
    "wan12-f2:3:pyramid:1:torch",  # 50 tokens a block: padded, cut across frames
    "magi12:3:pyramid:2:torch",  # GQA (12 query, 6 kv heads), 2-frame chunks, three-pass guidance
] + (["wan12:2:sequential:0:yunchang"] if yunchang_available() else [])
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _one_device(case: str) -> tuple[torch.Tensor, int]:
    session = build_session(case_preset(case), WeightPaths(seed=3), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        latents = torch.cat([b.latents for b in session.run("a red circle", blocks=BLOCKS, seed=0)], dim=2)
    return latents, session.executors(NoiseSource(0), blocks_in_forward=1).cache.nbytes


def test_sp_2_3_4_equal_one_device(tmp_path):
    command = ["timeout", "-k", "5", "600", sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=4", str(WORKER), "--out", str(tmp_path), "--blocks", str(BLOCKS),
               "--cases", *CASES]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=660, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in CASES:
        sp = int(case.split(":")[1])
        saved = torch.load(tmp_path / f"{case.replace(':', '-')}.pt")
        expected, kv_bytes = _one_device(case)
        assert_close(saved["latents"], expected, 1e-5, f"sp {sp} vs one device, {case}")
        assert saved["kv_bytes"] * sp == kv_bytes, f"each of {sp} ranks keeps 1/{sp} of the heads' K/V"


def test_slices_cover_the_tokens_once_and_groups_stay_in_frames():
    """Every token of a forward is in exactly one slice; a slice's groups of tokens each lie in
    one frame (padding is conditioned as the last frame), so per-frame modulation stays exact."""
    for frames, T, sp in [(3, 25, 2), (6, 25, 4), (2, 25, 3), (5, 16, 3), (3, 1560, 8), (1, 7, 6)]:
        slices = [Slice(frames, T, sp, rank) for rank in range(sp)]
        covered = [t for s in slices for t in range(s.start, s.start + s.length)]
        assert covered == list(range(slices[0].padded)) and slices[0].padded - frames * T < sp
        for s in slices:
            group = s.length // sum(count for _, count in s.runs)
            frame_of = [f for f, count in s.runs for _ in range(count * group)]
            expected = [min(t // T, frames - 1) for t in range(s.start, s.start + s.length)]
            assert frame_of == expected, (frames, T, sp, s.start)


def test_splits_the_heads_cannot_make_are_refused():
    class Exchange:
        rank = 0

        def __init__(self, size):
            self.size = size

    Ulysses(Exchange(4)).check(heads=40, kv_heads=40)  # the 14B at sp 4 and 8: any latent size
    Ulysses(Exchange(8)).check(heads=40, kv_heads=40)
    Ulysses(Exchange(6)).check(heads=12, kv_heads=12)  # the 1.3B: 2, 3, 4, 6
    with pytest.raises(ValueError, match=r"sp 5 must divide the model's 12 query heads: use --sp 2 or 3 or 4 or 6"):
        Ulysses(Exchange(5)).check(heads=12, kv_heads=12)
    with pytest.raises(ValueError, match=r"24 query and 8 key/value heads: use --sp 2 or 4 or 8"):
        Ulysses(Exchange(3)).check(heads=24, kv_heads=8)
    with pytest.raises(ConfigError, match=r"^sp 3 must divide the model's 2 query heads: use --sp 2$"):
        build_session(get_preset("tiny-wan"), WeightPaths(seed=3), torch.device("cpu"), torch.float32,
                      sharding=Ulysses(Exchange(3)))  # fmt: skip


def _torchrun(ranks: int, *args: str) -> list[str]:
    return ["timeout", "-k", "5", "300", sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", *args]  # fmt: skip


def test_generate_runs_the_sequential_plan_on_2_sp_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m engine.generate --sp 2` runs the preset's own (sequential)
    plan: one MP4, written once, with the frames one process writes."""
    args = ["--preset", "tiny-wan", "--blocks", "3", "--seed", "0"]
    with torch.no_grad():
        assert generate([*args, "--out", str(tmp_path / "one.mp4")]) == 0
    command = _torchrun(2, "-m", "engine.generate", *args, "--sp", "2", "--out", str(tmp_path / "sp.mp4"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=330, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1, "only rank 0 writes"
    assert "sp 2 share every forward of the sequential plan" in result.stderr, "sp is reported at start-up"
    expected, actual = read_frames(tmp_path / "one.mp4"), read_frames(tmp_path / "sp.mp4")
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    # latents equal to float rounding give the same 8-bit frames, up to a rare step at a rounding edge
    assert diff.max() <= 2 and diff.mean() < 0.01, f"max diff {diff.max()}, mean {diff.mean():.4f}"


def test_a_shared_stream_streams_on_2_sp_ranks():
    """`torchrun ... -m engine.stream --shared-stream --sp 2`: the preset's sequential plan on one
    sp group serves frames and takes a prompt; stopping the serving rank ends every rank cleanly."""
    command = _torchrun(2, "-m", "launch.stream", "--preset", "tiny-wan", "--shared-stream", "--sp", "2",
                        "--port", "0", "--no-pace")  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                               start_new_session=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 200
        while not any(line.startswith("serving") for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        base = re.search(r"http://[\d.]+:\d+", next(line for line in lines if line.startswith("serving"))).group(0)
        with connect(base.replace("http", "ws") + "/ws", max_size=2**24) as ws:
            ws.send('{"type": "prompt", "text": "a blue square moving up"}')
            frames = _binary(ws, 3)
        assert [decode_frame(f).index for f in frames] == sorted(decode_frame(f).index for f in frames)
        os.kill(_worker(process.pid, 0), signal.SIGTERM)  # the serving rank stops; the other follows
        code = process.wait(timeout=120)
        left = _session_alive(process.pid)
    finally:
        _kill_session(process)
        reader.join(timeout=10)
    assert code == 0, "".join(lines)[-3000:]
    assert not left, f"processes left behind: {left}"


def _binary(ws, count: int) -> list[bytes]:
    """The next `count` frames (binary messages) of a viewer's socket."""
    frames = []
    while len(frames) < count:
        message = ws.recv(timeout=60)
        if isinstance(message, bytes):
            frames.append(message)
    return frames
