"""Shared forwards: one model call for k streams' ticks vs k calls, at the token counts a tick has.

For each preset, k streams (sequential plan, their own seeds and prompts) are run until their
windows are full; then for each k the tick's forward is timed two ways on the same streams:
`separate` (each stream's own forward, one after another, as k executors would run) and `shared`
(one call for all k through engine/runtime/coalesce.py). Only the forward is timed (the median
over --ticks ticks); the rest of a tick is the same either way. If the shared call of k costs
about one separate call, the forward is per-call-overhead-bound and coalescing gains up to k;
if it costs k of them, it is compute-bound and coalescing gains nothing.

The attention columns time one layer's self-attention for the same k streams when half of them
have just joined (keys of their own block only, the rest a full window): one call over keys
padded to the longest with a per-sample mask `[B, 1, N, M]` (what a shared forward does) vs one
call per stream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.demo.scenes import COLORS, SHAPES
from engine.devices import resolve_device
from engine.plan.timeline import Tick
from engine.runtime.coalesce import shared_forward, step_together
from engine.runtime.executor import Executor
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.benchmarks.common import session_for
from launch.presets import get_preset

COLUMNS = ["preset", "streams", "query_tokens", "key_tokens", "separate_ms", "shared_ms", "speedup",
           "attn_each_ms", "attn_padded_ms"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["demo", "mid-wan"], help="model presets")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="streams per forward (k)")
    parser.add_argument("--ticks", type=int, default=10, help="ticks timed per k and way (the median is reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def run(args: argparse.Namespace) -> tuple[list[dict], list[str], dict]:
    if min(args.streams) < 1 or args.ticks < 1:
        raise ConfigError("--streams and --ticks must be >= 1")
    device = resolve_device(args.device)
    rows = []
    for name in args.presets:
        session = session_for(get_preset(name), device, WeightPaths(seed=0))
        streams = _warm_streams(session, max(args.streams))
        for k in args.streams:
            rows.append(_row(name, session, streams[:k], args.ticks))
    settings = dict(device=str(device), torch_threads=torch.get_num_threads(), load_average=os.getloadavg(),
                    cores=os.cpu_count(), ticks=args.ticks)  # fmt: skip
    print(f"{settings['torch_threads']} torch thread(s); load average {settings['load_average'][0]:.2f} "
          f"on {settings['cores']} cores")  # fmt: skip
    return rows, COLUMNS, settings


class _Stream:
    """One viewer's stream: its executor, its plan's ticks, its prompt's K/V."""

    def __init__(self, session: Session, index: int):
        prompt = f"a {list(COLORS)[index % len(COLORS)]} {SHAPES[index % len(SHAPES)]} moving left"
        self.executor: Executor = session.executors(NoiseSource(index), blocks_in_forward=1)
        self.ticks = iter(session.plan(None))
        self.text = session.prompts.conditioning(prompt)

    def next_tick(self) -> Tick:
        return next(self.ticks)


def _warm_streams(session: Session, count: int) -> list[_Stream]:
    """`count` streams run (together) until their KV windows are full: every later tick's forward
    has the same query and key counts."""
    streams = [_Stream(session, i) for i in range(count)]
    stream = session.preset.stream
    ticks = (stream.window_frames // stream.frames_per_block + 1) * (session.schedule.steps + 1)
    for _ in range(ticks):
        step_together([(s.executor, s.next_tick(), s.text) for s in streams])
    return streams


def _timed_tick(streams: list[_Stream], shared: bool) -> float:
    """One tick of every stream; seconds its forward(s) took."""
    prepared = [s.executor.prepare(s.next_tick(), s.text) for s in streams]
    start = _now(streams)
    if shared:
        shared_forward([(s.executor, p) for s, p in zip(streams, prepared)])
    else:
        for s, p in zip(streams, prepared):
            p.flows = s.executor.forward(p.run, p.text, p.view)
    seconds = _now(streams) - start
    for s, p in zip(streams, prepared):
        s.executor.finish(p)
    return seconds


def _now(streams: list[_Stream]) -> float:
    if streams[0].executor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _row(name: str, session: Session, streams: list[_Stream], ticks: int) -> dict:
    separate = statistics.median([_timed_tick(streams, shared=False) for _ in range(ticks)])
    shared = (
        statistics.median([_timed_tick(streams, shared=True) for _ in range(ticks)]) if len(streams) > 1 else separate
    )
    cache = streams[0].executor.cache
    queries = session.preset.stream.frames_per_block * cache.T
    keys = (cache.visible_frames * cache.T) + queries
    each, padded = _attention(session, len(streams), queries, keys, max(ticks, 20))
    return dict(preset=name, streams=len(streams), query_tokens=queries, key_tokens=keys,
                separate_ms=round(1e3 * separate, 2), shared_ms=round(1e3 * shared, 2),
                speedup=round(separate / shared, 2), attn_each_ms=round(1e3 * each, 3),
                attn_padded_ms=round(1e3 * padded, 3))  # fmt: skip


def _attention(session: Session, k: int, queries: int, keys: int, repeats: int) -> tuple[float, float]:
    """One layer's self-attention for k streams, every other one just joined (keys: its own
    block's only): (one SDPA call per stream, one padded call with a per-sample mask), seconds."""
    cfg, device = session.preset.model, session.device
    lengths = [queries if i % 2 else keys for i in range(k)]
    q = torch.randn(k, cfg.num_heads, queries, cfg.head_dim, device=device, dtype=session.model.dtype)
    kv = [torch.randn(1, cfg.num_heads, m, cfg.head_dim, device=device, dtype=q.dtype) for m in lengths]
    padded = torch.zeros(k, cfg.num_heads, keys, cfg.head_dim, device=device, dtype=q.dtype)
    mask = torch.zeros(k, 1, queries, keys, dtype=torch.bool, device=device)
    for i, (t, m) in enumerate(zip(kv, lengths)):
        padded[i, :, :m], mask[i, :, :, :m] = t[0], True

    def each():
        for i, t in enumerate(kv):
            F.scaled_dot_product_attention(q[i : i + 1], t, t)

    def one():
        F.scaled_dot_product_attention(q, padded, padded, attn_mask=mask if min(lengths) < keys else None)

    return _median_seconds(each, repeats, device), _median_seconds(one, repeats, device)


def _median_seconds(call, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
