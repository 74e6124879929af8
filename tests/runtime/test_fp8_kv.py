"""The fp8 (e4m3) KV cache: the round trip is e4m3 rounding, one attention call stays within the
bound that rounding implies, a tiny-wan stream stays close to the model-dtype one, ring wraps and
the re-based sink are exact against a model-dtype cache holding the same rounded K/V, and memory
is counted as allocated.

pytest tests/runtime/test_fp8_kv.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_compile import _fresh_counters as fresh_counters
from test_compile import _stream as compile_stream
from test_kv import NaiveWindowView, _text
from torch._dynamo.utils import counters

from engine.config import SpeedConfig
from engine.loading import build_kv_cache
from engine.models.rope import Rope
from engine.runtime.compiled import FastForward
from engine.runtime.fp8 import E4M3, UNIT_ROUNDOFF, dequantise, quantise, roundtrip_bound
from engine.runtime.kv import KVCache
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import TINY, assert_close, tiny_model
from launch.build import build_session
from launch.presets import get_preset
from tests.models.test_magi import TINY as MAGI_TINY
from tests.models.test_magi import _distilled

CPU = torch.device("cpu")
BLOCK = 3


def _cache(cfg, rope, *, sink, ring, scratch=BLOCK, storage, rebase_sink=False, dtype=torch.float32, device=CPU):
    return KVCache(
        rope=rope, layers=cfg.num_layers, batch=1, heads=cfg.kv_heads, head_dim=cfg.head_dim, sink_frames=sink,
        ring_frames=ring, scratch_frames=scratch, dtype=dtype, device=device, rebase_sink=rebase_sink, storage=storage,
    )  # fmt: skip


def _differences(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """max abs, mean abs, and relative RMS difference (against expected's RMS)."""
    diff = (actual.double() - expected.double()).abs()
    return diff.max().item(), diff.mean().item(), (diff.norm() / expected.double().norm()).item()


# -- quantisation --------------------------------------------------------------------------------


def test_round_trip_is_within_e4m3_rounding():
    """quantise -> dequantise errs by at most 2^-4 of each value (half e4m3's step, 3 mantissa
    bits), or half the subnormal step times the scale for values under 2^-6 of it; the bound is
    reached, so it is e4m3's own and not a margin."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 6, 64)[:, None, None]  # tokens over 12 orders of magnitude
    x = torch.randn(64, 4, 32, generator=generator) * magnitudes
    x[3, 1] = 0.0  # an all-zero vector
    x[5, 2, :8] *= 1e-4  # entries far below their vector's largest: e4m3 subnormals
    payload, scales = torch.empty(x.shape, dtype=E4M3), torch.empty(64, 4, 1)
    quantise(x, payload, scales)
    back = dequantise(payload, scales, torch.empty_like(x))
    err, bound = (back - x).abs(), roundtrip_bound(x, scales)
    slack = 1e-6 * x.abs()  # float32 rounding of the division and the multiply
    worst = (err - bound - slack).max().item()
    assert worst <= 0, f"round trip exceeds e4m3 rounding by {worst:.3e} (max err {err.max():.3e})"
    assert torch.equal(back[3, 1], x[3, 1]), "an all-zero vector must come back as zeros"
    reached = (err / bound).nan_to_num().max().item()
    assert reached > 0.9, f"the error only reaches {reached:.2f} of the bound: e4m3 should reach it"
    assert payload.element_size() == 1 and torch.isfinite(back).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dequantisation_equals_torchs_float8_cast(dtype):
    """The CPU path (e4m3 bits re-read as float16) gives exactly what casting float8 gives, for
    every finite e4m3 code and with per-vector scales."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
    finite = codes[~codes.float().isnan()].expand(12, 254)  # every finite code, under 12 scales
    scales = torch.logspace(-4, 4, 12)[:, None]
    expected = torch.empty(finite.shape, dtype=dtype).copy_(finite).mul_(scales)
    actual = dequantise(finite, scales, torch.empty(finite.shape, dtype=dtype))
    assert torch.equal(actual, expected), f"max diff {(actual.float() - expected.float()).abs().max():.3e}"


# -- one attention call --------------------------------------------------------------------------


def _committed_twins(heads: int, frames: int, seed: int = 0):
    """A model-dtype and an fp8 cache holding the same committed K/V (random, `frames` frames)."""
    cfg, grid = TINY, (2, 2)
    caches = [_cache(cfg, Rope(cfg, grid), sink=0, ring=frames, storage=s) for s in ("model", "fp8")]
    generator, T = torch.Generator().manual_seed(seed), caches[0].T
    for start in range(0, frames, BLOCK):
        shape = (cfg.num_layers, 1, BLOCK * T, heads, cfg.head_dim)
        keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        for cache in caches:
            cache.append(start, keys, values)
    return caches


@torch.no_grad()
def test_attention_over_fp8_context_is_within_the_e4m3_bound():
    """One layer's attention with the committed K/V read from fp8 differs from the exact one by at
    most what e4m3 rounding allows. The keys and values read are within e4m3 rounding of the exact
    ones (elementwise), and attention propagates that: keys off by dk move query i's logits by at
    most eps_i = max_j |q_i . dk_j| / sqrt(Dh), which scales each softmax weight by a factor within
    e^(+-2 eps_i); values off by dv move a convex combination by at most max_j |dv_j|. So per query
    and channel: |do| <= (e^(2 eps_i) - 1) max_j |v_j| + max_j |dv_j|."""
    exact, fp8 = _committed_twins(TINY.num_heads, frames=6)
    generator, T, Dh = torch.Generator().manual_seed(1), exact.T, TINY.head_dim
    q, k, v = (torch.randn(1, BLOCK * T, TINY.num_heads, Dh, generator=generator) for _ in range(3))
    outs, reads = [], []
    for cache in (exact, fp8):
        view = cache.view(first_frame=6, frames=BLOCK, block_frames=BLOCK, mode="causal")
        q_rot, keys, values, mask = view.context(0, q, k, v)
        reads.append((keys.clone(), values.clone()))
        attend = F.scaled_dot_product_attention(q_rot.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                attn_mask=mask)  # fmt: skip
        outs.append(attend.transpose(1, 2))  # [B, N, H, Dh]
    (keys, values), (fp8_keys, fp8_values) = reads
    committed = 6 * T
    for name, read, true, scales in (
        ("keys", fp8_keys, keys, fp8.fp8.k_scale),
        ("values", fp8_values, values, fp8.fp8.v_scale),
    ):
        bound = roundtrip_bound(true[:, :committed], scales[0, :, :committed]) + 1e-6 * true[:, :committed].abs()
        assert ((read[:, :committed] - true[:, :committed]).abs() <= bound).all(), f"{name} read beyond e4m3 rounding"
        assert torch.equal(read[:, committed:], true[:, committed:]), f"in-flight {name} must be exact"
    dk, dv = fp8_keys - keys, fp8_values - values
    eps = torch.einsum("bqhd,bkhd->bhqk", q_rot, dk).abs().amax(-1) / math.sqrt(Dh)  # [B, H, N]
    bound = (torch.exp(2 * eps) - 1).transpose(1, 2)[..., None] * fp8_values.abs().amax(1, keepdim=True)
    bound = bound + dv.abs().amax(1, keepdim=True) + 1e-6  # [B, N, H, Dh]
    err = (outs[1] - outs[0]).abs()
    print(f"attention: max err {err.max():.3e}, mean {err.mean():.3e}; bound max {bound.max():.3e}")
    assert (err <= bound).all(), f"exceeds the e4m3 bound by {(err - bound).max():.3e}"
    assert err.max() > 1e-4, "the fp8 read should differ from the exact one"


# -- a stream ------------------------------------------------------------------------------------


@torch.no_grad()
def test_tiny_wan_stream_with_fp8_cache_stays_close():
    """8 blocks of tiny-wan (window 9 with a 3-frame sink: the ring wraps from block 3) with the
    committed K/V in fp8: the latents' relative RMS difference stays under e4m3's unit roundoff
    2^-4, the relative error of each single K/V element, though every later block reads rounded
    context and feeds it on."""
    videos = {}
    for storage in ("model", "fp8"):
        session = build_session(get_preset("tiny-wan"), WeightPaths(seed=3), CPU, torch.float32,
                                speed=SpeedConfig(kv_cache=storage))  # fmt: skip
        run = session.run("a blue square", blocks=8, seed=5)
        videos[storage] = torch.cat([b.latents for b in run], dim=2)
        assert session.executors(NoiseSource(0), blocks_in_forward=1).cache.storage == storage
    max_diff, mean_diff, relative = _differences(videos["fp8"], videos["model"])
    print(f"tiny-wan, 8 blocks: max {max_diff:.3e}, mean {mean_diff:.3e}, relative RMS {relative:.3e}")
    assert 0 < relative < UNIT_ROUNDOFF, f"relative RMS {relative:.3e} (max {max_diff:.3e}, mean {mean_diff:.3e})"


# -- ring wrap and the re-based sink -------------------------------------------------------------


def _round_trip_frames(cache: KVCache, slots: set[int]) -> None:
    """Replace a model-dtype cache's K/V in frame `slots` by their e4m3 round trip, in place."""
    T = cache.T
    for slot in slots:
        for buffer in (cache.k, cache.v):
            part = buffer[:, :, slot * T : (slot + 1) * T]
            payload, scales = torch.empty(part.shape, dtype=E4M3), torch.empty(*part.shape[:-1], 1)
            quantise(part, payload, scales)
            dequantise(payload, scales, part)


class RoundedTwin:
    """A model-dtype cache that rounds what it commits as the fp8 cache does: each newly committed
    frame, and the sink whenever re-basing rewrote it, goes through the e4m3 round trip."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def commit(self, view) -> None:
        cache, T = self.cache, self.cache.T
        before = cache.committed
        sink = cache.k[:, :, : cache.S * T].clone()
        view.commit()
        slots = {cache.slot_of(f) for f in range(before, cache.committed)} - {None}
        if not torch.equal(sink, cache.k[:, :, : cache.S * T]):
            slots |= set(range(cache.S))
        _round_trip_frames(cache, slots)


@pytest.mark.parametrize("sink,ring,mode", [(3, 6, "rebased"), (3, 6, "fixed"), (2, 5, "rebased"), (0, 4, "fixed")])
@torch.no_grad()
def test_ring_wrap_and_sink_modes_with_fp8(sink, ring, mode):
    """40 blocks, the ring wrapping every few (ring=5 mid-block): the fp8 cache equals a model-dtype
    cache holding the same rounded K/V to float rounding (so its slots, sink copy and re-basing are
    right), and stays within e4m3's unit roundoff of the exact reference window
    (tests/runtime/test_kv.py's NaiveWindowView, which re-rotates every key afresh)."""
    model, grid, blocks = tiny_model(), (2, 2), 40
    rope, rebase = Rope(TINY, grid), mode == "rebased"
    fp8 = _cache(TINY, rope, sink=sink, ring=ring, storage="fp8", rebase_sink=rebase)
    twin = RoundedTwin(_cache(TINY, rope, sink=sink, ring=ring, storage="model", rebase_sink=rebase))
    store = {"k": [[] for _ in range(TINY.num_layers)], "v": [[] for _ in range(TINY.num_layers)]}
    text, generator, worst = _text(model), torch.Generator().manual_seed(5), 0.0
    for b in range(blocks):
        x, sigma = torch.randn(1, TINY.in_channels, BLOCK, 4, 4, generator=generator), torch.full((1, BLOCK), 0.3)
        for commit in (False, True):
            views = [cache.view(first_frame=b * BLOCK, frames=BLOCK, block_frames=BLOCK, mode="causal",
                                commit_frames=BLOCK * commit) for cache in (fp8, twin.cache)]  # fmt: skip
            naive = NaiveWindowView(store, rope, sink, ring, b * BLOCK, BLOCK, commit, mode)
            ours, rounded = model(x, sigma, text, views[0]), model(x, sigma, text, views[1])
            exact = model(x, sigma, text, naive)
            views[0].commit(), twin.commit(views[1]), naive.commit()
            assert_close(ours, rounded, 1e-5, f"block {b}, commit={commit}: fp8 vs the same rounding in model dtype")
            worst = max(worst, _differences(ours, exact)[2])
    assert fp8.committed == blocks * BLOCK and fp8.visible_frames == sink + ring
    print(f"{mode} sink {sink} ring {ring}: worst relative RMS vs the exact window {worst:.3e}")
    assert 0 < worst < UNIT_ROUNDOFF, f"relative RMS {worst:.3e} against the exact window"


# -- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["self-forcing-1.3b", "wan-14b-causal"])
def test_fp8_bytes_count_payload_scales_scratch_and_working_buffer(name):
    """At 480x832 (meta device): per layer, the committed frames' K and V at 1 byte per element
    plus a float32 scale per head vector, the scratch in bf16; one layer's bf16 working buffer.
    For a 21-frame window with 3-frame blocks that is 0.62x the bf16 cache, not 0.5x: the scratch
    and the working buffer stay in the model dtype."""
    preset = get_preset(name)
    cfg, stream = preset.model, preset.stream
    model, fp8 = (build_kv_cache(preset, torch.bfloat16, "meta", storage=s) for s in ("model", "fp8"))
    vectors = 2 * cfg.kv_heads * preset.tokens_per_frame  # head vectors of K and V in one frame
    layers, committed, scratch, Dh = cfg.num_layers, stream.context_frames, stream.frames_per_block, cfg.head_dim
    assert model.nbytes == layers * (committed + scratch) * vectors * Dh * 2
    payload_and_scales = layers * committed * vectors * (Dh + 4)
    expected = payload_and_scales + layers * scratch * vectors * Dh * 2 + (committed + scratch) * vectors * Dh * 2
    ratio = fp8.nbytes / model.nbytes
    print(f"{name}: bf16 {model.nbytes / 2**30:.2f} GiB, fp8 {fp8.nbytes / 2**30:.2f} GiB ({ratio:.3f}x)")
    assert fp8.nbytes == expected, f"fp8 cache reports {fp8.nbytes} bytes, allocates {expected}"
    assert 0.6 < ratio < 0.63


def test_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="storage must be one of"):
        _cache(TINY, Rope(TINY, (2, 2)), sink=0, ring=3, storage="int4")


# -- MAGI-1 --------------------------------------------------------------------------------------


def _magi(storage: str, distilled: bool = False, **plan):
    preset = _distilled(MAGI_TINY, **plan) if distilled else MAGI_TINY
    return build_session(preset, WeightPaths(seed=2), CPU, torch.float32, speed=SpeedConfig(kv_cache=storage))


@torch.no_grad()
def test_magi_with_fp8_cache():
    """MAGI-1 tiny (GQA: 2 query heads on 1 KV head), distilled: the fp8 stream stays within e4m3's
    unit roundoff of the stream that recomputes the clean history in every forward (which the
    model-dtype cache equals, tests/models/test_magi.py); with base guidance, whose null-caption pass
    writes the K/V both conditioned passes read, both batch elements hold the same payload and
    scales."""
    videos = {}
    for name, session in (("fp8", _magi("fp8", True)), ("recomputed", _magi("model", True, compute="window"))):
        videos[name] = torch.cat([b.latents for b in session.run("a red circle", blocks=6, seed=0)], dim=2)
    max_diff, mean_diff, relative = _differences(videos["fp8"], videos["recomputed"])
    print(f"magi-1-tiny, 6 chunks: max {max_diff:.3e}, mean {mean_diff:.3e}, relative RMS {relative:.3e}")
    assert 0 < relative < UNIT_ROUNDOFF, f"relative RMS {relative:.3e} (max {max_diff:.3e})"
    session = _magi("fp8")
    executor = session.executors(NoiseSource(0), blocks_in_forward=5)
    list(executor.run(session.plan(5), session.prompts.conditioning("a red circle")))
    cache, tokens = executor.cache, executor.cache.visible_frames * executor.cache.T
    assert cache.storage == "fp8" and cache.commit_from == 1 and tokens > 0
    for part in (cache.fp8.k, cache.fp8.v, cache.fp8.k_scale, cache.fp8.v_scale):
        committed = part[:, :, :tokens]
        assert torch.equal(committed[:, 0].float(), committed[:, 1].float()), "both passes read the null pass's K/V"


# -- a compiled forward --------------------------------------------------------------------------


def test_fp8_cache_compiles_without_graph_breaks():
    """--compile with --kv-cache fp8 (dynamo with the eager backend, as tests/runtime/test_compile.py):
    the dequantising read traces into the forward's graph, no more graphs than the window's
    layouts and none once it slides, the latents equal eager's."""
    sessions = {}
    for compile in ("off", "default"):
        session = build_session(get_preset("tiny-wan"), WeightPaths(seed=3), CPU, torch.float32,
                                speed=SpeedConfig(compile=compile, kv_cache="fp8"))  # fmt: skip
        assembly = session.executors
        assembly.fast = FastForward(assembly.model, assembly.speed, assembly.fast.attention, backend="eager")
        assembly.runner = assembly.fast
        sessions[compile] = session
    eager, _ = compile_stream(sessions["off"], 20)
    fresh_counters()
    compiled, graphs = compile_stream(sessions["default"], 20)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[-1] <= 3 and graphs[-6] == graphs[-1], f"graphs after each tick {graphs}"
    assert_close(compiled, eager, 1e-5, "compiled vs eager latents, fp8 cache")
