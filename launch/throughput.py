"""Throughput model of one stream on several GPUs: Block Cascading x Ulysses sequence parallelism.

A split is `cascade C x sp N (+ 1 decode rank)`: C cascade stages, each an sp group of N ranks.

Cascade (as launch/benchmarks/cascade_model.py describes it). With offset o, n = S // o + 1
blocks are in flight; a tick runs ceil(n / C) block forwards on every stage, each dearer than a
sequential forward by the extra keys of the other in-flight blocks (analytic FLOPs). Joint
context all-gathers the in-flight K/V per layer on the critical path; lagged context gathers
every layer's K/V once per tick, overlapped with compute. With sp, each sp rank exchanges only
its heads' K/V (1/N of the bytes) with its peer rank in every other stage. C = 1 runs the
sequential plan (one block in flight, no context overhead).

Sequence parallelism (Ulysses). A block's tokens [Q, d] are sharded over N ranks for the
projections and the FFN ([Q/N, d] per rank) and re-sharded by heads for attention (all Q
tokens, H/N heads). Per layer: an all-to-all of q and one of the packed k, v before attention,
one of the attention output after it (4 tensors of [Q, d] in all, bf16); each rank sends
(N - 1)/N of its [Q/N, 4d] shard. Cross-attention runs on the token shard against text K/V that
every rank holds, so it moves nothing; the cached context K/V is kept head-sharded, so it moves
nothing either. After the forward the block's output flow [16, F, h, w] (float32, the sampler's
dtype) is all-gathered. An all-to-all takes latency + bytes / (bandwidth x efficiency).

Small shards run below peak: GEMMs and attention are charged by waves of tiles on the 132 SMs
of an H100 (GEMM: 128 x 128 output tiles; attention: one 128-query tile of one head per CTA),
relative to the unsharded forward, so sp 1 costs exactly what the anchor says. This ignores
launch overheads (CUDA graphs) and cuBLAS' smaller tiles for thin GEMMs, so it errs towards
overstating the loss.

Decoding a block (Wan VAE, 12 frames at 480x832): 40.7 TFLOP, counted with torch's
FlopCounterMode on the decoder for a steady-state 3-latent-frame block; assumed to run at 35% of
an H100's 989 TFLOP/s dense bf16 peak: 117 ms. Wan2.2's VAE (2 x 2 pixel folding, a 256-wide
decoder) costs 530.8 TFLOP for LongLive-2.0's steady 8-latent-frame block (32 frames at
704x1280), counted the same way: 18.4 MFLOP per decoded pixel against Wan2.1's 8.5, so 1.53 s
per block. Other sizes scale by decoded pixels (`decode_seconds`). The anchors leave decoding out (Block Cascading
measures FPS as "time taken to denoise a block"), so it is added here: without a decode rank,
rank 0 decodes beside its compute and every stage waits for it at the next collective (a decode
more per block); a decode rank decodes in parallel and limits the rate only when it is slower.

Two machines: `cascade_link` carries the cascade's gathers, and `sp_cross` the share of each
all-to-all that goes to the other machine when an sp group spans both (N/2 ranks on each).
Links do not contend with each other, and nothing here ran on a GPU: these are modelled numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import Preset
from engine.families import family_of, forward_flops
from launch.presets import get_preset

ANCHOR_FPS = {"self-forcing-1.3b": 16.5, "wan-14b-causal": 4.5}  # one H100, published
PUBLISHED = {"self-forcing-1.3b": "16-17 FPS on 1 H100; Block Cascading: 30 FPS on 5 GPUs",
             "wan-14b-causal": "4.5 FPS on 1 H100; Block Cascading: 12.5 FPS on 5 GPUs"}  # fmt: skip
PUBLISHED_5_GPUS = {"self-forcing-1.3b": 30.0, "wan-14b-causal": 12.5}  # Block Cascading, FPS on 5 GPUs
H100_SMS, TILE = 132, 128
DECODE_S = 40.7e12 / (0.35 * 989e12)  # Wan VAE, one 12-frame block at 480x832 (see above)
# Decoder FLOPs per decoded pixel, by the VAE's pixel folding: 1 = Wan2.1's VAE, 2 = Wan2.2's (see above)
DECODE_FLOP_PER_PIXEL = {1: 40.7e12 / (12 * 480 * 832), 2: 530.8e12 / (32 * 704 * 1280)}
ACT_BYTES, LATENT_BYTES = 2, 4  # bf16 activations, float32 latents


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float
    """Per GPU, per direction."""
    latency_us: float
    """Per collective step."""
    a2a_efficiency: float = 1.0
    """Share of the bandwidth an all-to-all of these sizes (0.2-24 MB per peer) reaches."""


# NVLink 4 on H100 SXM: 18 links x 25 GB/s = 450 GB/s per direction (NVIDIA's 900 GB/s counts both).
# PCIe 5.0 x16: 64 GB/s raw per direction, ~50 GB/s achieved. InfiniBand NDR: 400 Gb/s = 50 GB/s per
# NIC (one per GPU, as in DGX H100), with a longer per-step latency (NIC + NCCL proxy), assumed 30 us.
# NVLink/PCIe latencies are the cascade model's. All-to-all efficiency is a judgement, not a
# measurement: messages of 0.2-24 MB per peer, split over N - 1 peers at once, fall short of the link's
# bandwidth; 0.7 assumed (0.8 on IB, where one NIC's 50 GB/s is the only limit).
NVLINK = Link("NVLink (H100, 450 GB/s per direction)", 450.0, 10.0, 0.7)
PCIE = Link("PCIe 5.0 x16 (~50 GB/s)", 50.0, 25.0, 0.7)
INFINIBAND = Link("InfiniBand NDR 400 Gb/s (~50 GB/s)", 50.0, 30.0, 0.8)
LINKS = {"nvlink": NVLINK, "pcie": PCIE, "ib": INFINIBAND}


@dataclass(frozen=True)
class Split:
    cascade: int
    sp: int
    decode_rank: bool = False

    @property
    def gpus(self) -> int:
        return self.cascade * self.sp + self.decode_rank

    def __str__(self) -> str:
        return f"cascade {self.cascade} x sp {self.sp}" + (" + decode rank" if self.decode_rank else "")


@dataclass(frozen=True)
class SplitTime:
    tick_s: float
    compute_s: float
    sp_comm_s: float
    cascade_comm_s: float
    period_s: float
    """Seconds per emitted block."""
    latency_s: float
    """A block's steps and commit, plus its decode."""
    fps: float
    denoise_fps: float
    """Decoding left out, as Block Cascading measures FPS ("time taken to denoise a block")."""
    ideal_fps: float
    """No communication, perfect 1/N compute."""


def decode_seconds(preset: Preset) -> float:
    """One steady block's decode at 35% of an H100's peak: Wan2.1's or Wan2.2's VAE by decoded
    pixels; other latent spaces (MAGI-1, the demo's patches) as the Wan2.1 block (DECODE_S)."""
    per_pixel = DECODE_FLOP_PER_PIXEL.get(preset.vae.pixel_patch) if preset.vae.kind == "wan" else None
    if per_pixel is None:
        return DECODE_S
    frames = preset.vae.temporal_stride * preset.stream.frames_per_block
    return per_pixel * frames * preset.stream.height * preset.stream.width / (0.35 * 989e12)


def block_forward_s(preset_name: str, measured: dict[str, float]) -> float:
    """One sequential block forward of a named preset: measured (ms), else as preset_forward_s."""
    if preset_name in measured:
        return measured[preset_name] / 1000
    return preset_forward_s(get_preset(preset_name))


def preset_forward_s(preset: Preset) -> float:
    """From the published single-GPU FPS of the preset (or of the 1.3B one), t = frames / (FPS *
    (S + 1)); a preset that differs from the anchored one is scaled by analytic FLOPs."""
    reference = preset.name if preset.name in ANCHOR_FPS else "self-forcing-1.3b"
    anchor = get_preset(reference)
    frames = anchor.vae.temporal_stride * anchor.stream.frames_per_block  # steady-state frames per block
    seconds = frames / (ANCHOR_FPS[reference] * (anchor.sampling.steps + 1))
    return seconds if preset == anchor else seconds * _block_flops(preset) / _block_flops(anchor)


def _block_flops(preset: Preset) -> int:
    T, block = preset.tokens_per_frame, preset.stream.frames_per_block
    return forward_flops(preset.model, block * T, preset.stream.window_frames * T, preset.text.text_len)


def kv_bytes_per_layer(preset) -> int:
    """K and V of one block for one layer, bf16."""
    return 2 * preset.stream.frames_per_block * preset.tokens_per_frame * preset.model.dim * 2


def context_cost(preset, in_flight: int) -> float:
    """Forward cost of a cascaded block relative to a sequential one (more keys to attend to)."""
    T, block = preset.tokens_per_frame, preset.stream.frames_per_block
    window = preset.stream.window_frames
    sequential = forward_flops(preset.model, block * T, window * T, preset.text.text_len)
    cascaded = forward_flops(preset.model, block * T, (window + (in_flight - 1) * block) * T, preset.text.text_len)
    return cascaded / sequential


def blocks_in_flight(preset, offset: int) -> int:
    steps = preset.sampling.steps
    return steps // offset + 1 if offset else steps + 1


def activation_bytes_per_layer(preset) -> int:
    """q, k, v and the attention output of one block for one layer, bf16: the all-to-alls' payload."""
    cfg = preset.model
    return (
        preset.stream.frames_per_block
        * preset.tokens_per_frame
        * (2 * cfg.dim + 2 * cfg.kv_heads * cfg.head_dim)
        * ACT_BYTES
    )


def a2a_bytes_per_layer(preset, sp: int, blocks: int = 1) -> float:
    """Bytes each sp rank sends per layer: (N - 1)/N of its 1/N share of the payload."""
    return (sp - 1) / sp * blocks * activation_bytes_per_layer(preset) / sp


def latent_bytes(preset) -> int:
    """One block's output flow [C, F, h, w], float32."""
    h, w = preset.latent_hw
    return preset.model.out_channels * preset.stream.frames_per_block * h * w * LATENT_BYTES


def sp_refusal(preset, sp: int) -> str | None:
    """Why the Ulysses layout (engine/runtime/sharding.py) cannot split a forward over `sp` ranks:
    each rank takes a contiguous slice of the tokens (padded: any count) and whole groups of query
    and key/value heads."""
    cfg = preset.model
    if cfg.num_heads % sp or cfg.kv_heads % sp:
        kv = f" ({cfg.kv_heads} key/value)" if cfg.kv_heads != cfg.num_heads else ""
        return f"sp {sp} does not divide {cfg.num_heads} heads{kv}"
    return None


def _wave_time(flops: float, tiles: int) -> float:
    """FLOPs divided by the share of the SMs the kernel's last-rounded waves keep busy."""
    waves = math.ceil(tiles / H100_SMS)
    return flops * waves * H100_SMS / tiles


def _layer_time(preset, sp: int, query_tokens: int, key_tokens: int) -> float:
    """One Wan layer on one sp rank, in FLOP-equivalents: the token shard [m, d] through the six
    d x d projections (self q, k, v, o; cross q, o) and the FFN, the head shard (all query tokens,
    ceil(H / N) heads) through self-attention, and the token shard through cross-attention."""
    cfg, text = preset.model, preset.text.text_len
    d, f, m = cfg.dim, cfg.ffn_dim, math.ceil(query_tokens / sp)
    heads = math.ceil(cfg.num_heads / sp)  # padded when N does not divide the heads
    rows = math.ceil(m / TILE)
    gemms = [(d, d)] * 6 + [(d, f), (f, d)]  # (inner, output width)
    time = sum(_wave_time(2 * m * k * n, rows * math.ceil(n / TILE)) for k, n in gemms)
    time += _wave_time(4 * query_tokens * key_tokens * cfg.head_dim * heads, math.ceil(query_tokens / TILE) * heads)
    return time + _wave_time(4 * m * text * d, rows * cfg.num_heads)


def shard_factor(preset, sp: int, query_tokens: int, key_tokens: int, waves: bool = True) -> float:
    """A rank's forward time under sp N relative to the unsharded forward: 1/N when ideal (or for
    a family whose layer this does not describe, MAGI-1's), else by waves of tiles."""
    if sp == 1:
        return 1.0
    if not waves or not family_of(preset.model).sp_layer_modelled:
        return 1.0 / sp
    return _layer_time(preset, sp, query_tokens, key_tokens) / _layer_time(preset, 1, query_tokens, key_tokens)


def _hop(size: float, link: Link) -> float:
    return size / (link.gbytes_per_s * 1e9) + link.latency_us * 1e-6


def _layer_a2a_s(shard: float, sp: int, link: Link, cross: Link | None) -> float:
    """A layer's three all-to-alls (q; k, v; output) of a rank's `shard` bytes in all. With
    `cross` the group spans two machines (N/2 ranks on each): the share for the other machine's
    peers goes over `cross`, concurrently with the rest."""
    speed = lambda lk: lk.gbytes_per_s * 1e9 * lk.a2a_efficiency  # noqa: E731
    if cross is None:
        return 3 * link.latency_us * 1e-6 + (sp - 1) / sp * shard / speed(link)
    local, remote = (sp // 2 - 1) / sp * shard, (sp // 2) / sp * shard
    return 3 * cross.latency_us * 1e-6 + max(local / speed(link), remote / speed(cross))


def sp_comm_s(preset, sp: int, blocks: int, link: Link, cross: Link | None = None) -> float:
    """Per forward of `blocks` blocks: every layer's all-to-alls, then the output's all-gather."""
    if sp == 1:
        return 0.0
    per_layer = _layer_a2a_s(blocks * activation_bytes_per_layer(preset) / sp, sp, link, cross)
    gather = (sp - 1) * _hop(blocks * latent_bytes(preset) / sp, cross or link)
    return preset.model.num_layers * per_layer + gather


def cascade_comm_s(preset, stages: int, blocks: int, sp: int, context: str, link: Link) -> float:
    """The in-flight K/V all-gather over the stages (ring): per layer (joint) or once per tick (lagged)."""
    if stages == 1:
        return 0.0
    per_block = kv_bytes_per_layer(preset) * blocks / sp  # each sp rank gathers its heads only
    layers = preset.model.num_layers
    if context == "joint":
        return layers * (stages - 1) * _hop(per_block, link)
    return (stages - 1) * _hop(per_block * layers, link)


def cascade_tick(preset, forward_s: float, stages: int, sp: int, offset: int, context: str, link: Link,
                 *, waves: bool = True, sp_overhead_s: float = 0.0, cascade_link: Link | None = None,
                 sp_cross: Link | None = None) -> tuple[float, float, float, float]:  # fmt: skip
    """(tick, compute, sp comm, cascade comm) seconds of one tick of `stages` x sp `sp` ranks."""
    in_flight = blocks_in_flight(preset, offset)
    stages = min(stages, in_flight)  # more stages than blocks in flight would idle
    blocks = math.ceil(in_flight / stages)
    compute = blocks * forward_s * context_cost(preset, in_flight)
    if sp > 1:
        T, block = preset.tokens_per_frame, preset.stream.frames_per_block
        keys = (preset.stream.window_frames + (in_flight - 1) * block) * T
        compute = compute * shard_factor(preset, sp, blocks * block * T, keys, waves) + sp_overhead_s
    sp_comm = sp_comm_s(preset, sp, blocks, link, sp_cross)
    gather = cascade_comm_s(preset, stages, blocks, sp, context, cascade_link or link)
    if context == "joint" or stages == 1:
        return compute + sp_comm + gather, compute, sp_comm, gather
    return max(compute + sp_comm, gather), compute, sp_comm, gather


def split_time(preset, forward_s: float, split: Split, offset: int, context: str, link: Link,
               *, decode_s: float | None = None, **options) -> SplitTime:  # fmt: skip
    """A split's steady state. One stage runs the sequential plan; `options` go to cascade_tick.
    `decode_s`: a block's decode (None: the preset's modelled one, `decode_seconds`)."""
    decode_s = decode_seconds(preset) if decode_s is None else decode_s
    steps = preset.sampling.steps
    offset = offset if split.cascade > 1 else steps + 1
    tick, compute, sp_comm, gather = cascade_tick(preset, forward_s, split.cascade, split.sp, offset, context, link,
                                                  **options)  # fmt: skip
    in_flight = blocks_in_flight(preset, offset)
    ideal_tick = math.ceil(in_flight / min(split.cascade, in_flight)) * forward_s * context_cost(preset, in_flight)
    frames = preset.vae.temporal_stride * preset.stream.frames_per_block

    def period(tick_s: float) -> float:
        if split.decode_rank:
            return max(offset * tick_s, decode_s)
        return offset * tick_s + decode_s

    return SplitTime(tick_s=tick, compute_s=compute, sp_comm_s=sp_comm, cascade_comm_s=gather,
                     period_s=period(tick), latency_s=(steps + 1) * tick + decode_s, fps=frames / period(tick),
                     denoise_fps=frames / (offset * tick),
                     ideal_fps=frames / period(ideal_tick / split.sp))  # fmt: skip


def splits(gpus: int, sps: list[int] | None = None) -> list[Split]:
    """Every cascade x sp factorisation of `gpus`, and of `gpus - 1` plus a decode rank."""
    found = []
    for decode in (False, True):
        compute = gpus - decode
        for sp in range(1, compute + 1):
            if compute % sp == 0 and (sps is None or sp in sps):
                found.append(Split(compute // sp, sp, decode))
    return found


# Blocks streamed from host memory (--offload layers, engine/runtime/streamed_layers.py). The host
# link is PCIe: 5.0 x16 (H100/H200, RTX 5090) moves about 50 GB/s from pinned memory, 4.0 x16
# (RTX 4090, A100 PCIe) about 25 GB/s: assumed, not measured here (the GPU report measures it).
HOST_LINKS = {"pcie5": 50.0, "pcie4": 25.0}
"""GB/s host-to-device from pinned memory."""


@dataclass(frozen=True)
class OffloadTime:
    forward_s: float
    """One forward with the blocks streamed."""
    copy_s: float
    """One block's copy: block bytes / bandwidth."""
    block_s: float
    """One block's compute: the resident forward / layers."""

    @property
    def bound(self) -> str:
        return "copy" if self.copy_s > self.block_s else "compute"


def offload_forward_s(forward_s: float, layers: int, block_bytes: float, gbytes_per_s: float,
                      resident: int = 1) -> OffloadTime:  # fmt: skip
    """A forward whose blocks after the first `resident` stream from host memory. With c the
    compute of one block (the resident forward / layers: the embeddings and head are a few percent,
    counted in c) and m = block bytes / bandwidth, block i+1 copies while block i computes into the
    other of two slots, so each streamed block takes max(c, m):

        t = resident * c + (layers - resident) * max(c, m)

    (the first streamed block's copy overlaps the resident blocks; it is not on the path)."""
    c, m = forward_s / layers, block_bytes / (gbytes_per_s * 1e9)
    return OffloadTime(forward_s=resident * c + (layers - resident) * max(c, m), copy_s=m, block_s=c)


def offload_fps(resident_fps: float, forward_s: float, layers: int, block_bytes: float, gbytes_per_s: float,
                resident: int = 1) -> float:  # fmt: skip
    """Denoising FPS with the blocks streamed: the resident FPS x resident forward / streamed forward."""
    timing = offload_forward_s(forward_s, layers, block_bytes, gbytes_per_s, resident)
    return resident_fps * forward_s / timing.forward_s
