"""fp8 (e4m3) storage of committed K/V: quantised once when a frame is committed, dequantised to
the model's dtype when a layer reads it.

Scales are per token and head: each `Dh`-vector is divided by `amax / 448` so its largest entry
lands on e4m3's largest finite value. e4m3 is a float (4 exponent, 3 mantissa bits), so the
relative error after rounding is at most 2^-4 whatever the scale, down to 2^-6 of the scale's
range; a coarser scale (per frame and head) only loses the small vectors of a frame to e4m3's
subnormals. Measured on the demo model's committed K/V, per token x head gives a 12-14% lower
RMS error than per frame x head (keys 2.2% vs 2.6%, values 2.3% vs 2.6%) and flushes no vector
to zero; it costs 4 bytes of scale per `Dh` bytes of payload (3% at Dh = 128).

Reading dequantises a layer's visible frames into one model-dtype working buffer shared by all
layers (a cast, then one in-place multiply by the scales), in every forward, rather than keeping
a dequantised copy per layer refreshed as frames commit: that copy would cost more memory than
the model-dtype cache it replaces. The read touches each committed element once while the
attention does one multiply-add per element and query, so its share shrinks with the queries
(demo model on CPU: 97 us against 883 us for one layer's attention of a block; `bench kv`).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
UNIT_ROUNDOFF = 2.0**-4
"""Round-to-nearest with 3 mantissa bits: |x - e4m3(x)| <= 2^-4 |x| for normal values."""
SUBNORMAL_STEP = 2.0**-9
"""Below 2^-6 e4m3 has a fixed step of 2^-9: the absolute error there is at most half of it."""


def quantise(x: torch.Tensor, payload: torch.Tensor, scales: torch.Tensor) -> None:
    """x `[..., Dh]` (any float dtype) into `payload` (e4m3, same shape) and `scales` `[..., 1]`
    (float32), so that `payload * scales` ~ x. All-zero vectors get scale 1."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    scales.copy_(scale)
    # amax / scale may round a hair past 448; e4m3fn has no infinity, so clamp rather than overflow
    payload.copy_((x / scale).clamp_(-E4M3_MAX, E4M3_MAX))


def dequantise(payload: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` = payload * scales, in out's dtype: a cast into `out`, then an in-place multiply (torch
    has no float8 type promotion, so the two cannot be one eager `mul`; under torch.compile the
    read is part of the forward's graph, where inductor can fuse them)."""
    if payload.device.type == "cpu":
        out.copy_(_as_float16(payload))
        return out.mul_(scales * 2.0**8)
    out.copy_(payload)
    return out.mul_(scales)


def _as_float16(payload: torch.Tensor) -> torch.Tensor:
    """e4m3 values times 2^-8, exactly, as float16. CPU torch converts float8 one element at a time
    (~7 ns each: the dequantisation took a third of a layer's attention on the demo model); these
    integer ops and the float16 conversion vectorise. e4m3's bits `s eeee mmm` shifted left by 7
    are float16's `s 0eeee mmm0000000`: the same value with the exponent bias 15 instead of 7
    (subnormals included). The int8 view is sign-extended, so bit 14 is cleared after the shift."""
    bits = payload.view(torch.int8).to(torch.int16).mul_(1 << 7)
    return bits.bitwise_and_(~(1 << 14)).view(torch.float16)


def roundtrip_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequantise(quantise(x))| e4m3 rounding allows, per element of x `[..., Dh]`
    (float32 arithmetic; scales `[..., 1]` as `quantise` chose them)."""
    return torch.maximum(UNIT_ROUNDOFF * x.abs(), 0.5 * SUBNORMAL_STEP * scales)


class Fp8Frames:
    """The committed frames of every layer in e4m3 with per token x head scales, and the working
    buffer a layer's read fills.

    payload `[L, B, tokens, H, Dh]` e4m3, scales `[L, B, tokens, H, 1]` float32 (token slots
    as in the model-dtype layout); work `[B, work_tokens, H, Dh]` in the model dtype, for K and V,
    holding one layer at a time: [dequantised visible frames | in-flight K/V].
    """

    def __init__(self, layers, batch, tokens, heads, head_dim, work_tokens, dtype, device):
        shape = (layers, batch, tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=E4M3, device=device)
        self.v = torch.zeros(shape, dtype=E4M3, device=device)
        self.k_scale = torch.ones((*shape[:-1], 1), dtype=torch.float32, device=device)
        self.v_scale = torch.ones((*shape[:-1], 1), dtype=torch.float32, device=device)
        self.work_k = torch.zeros((batch, work_tokens, heads, head_dim), dtype=dtype, device=device)
        # not zeros_like: on the meta device (the memory plan sizes this cache there) it imports sympy
        self.work_v = torch.zeros(self.work_k.shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        parts = (self.k, self.v, self.k_scale, self.v_scale, self.work_k, self.work_v)
        return sum(t.numel() * t.element_size() for t in parts)

    def put(self, span: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantise committed K/V `[L, B, n, H, Dh]` into token slots `span` of every layer."""
        quantise(keys, self.k[:, :, span], self.k_scale[:, :, span])
        quantise(values, self.v[:, :, span], self.v_scale[:, :, span])

    def put_keys(self, layer: int, span: slice, keys: torch.Tensor) -> None:
        """Re-quantise one layer's keys `[B, n, H, Dh]` (a re-rotated sink)."""
        quantise(keys, self.k[layer, :, span], self.k_scale[layer, :, span])

    def share(self, span: slice, source: int) -> None:
        """Every batch element's slots `span` become element `source`'s (payload and scales)."""
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            t[:, :, span] = t[:, source : source + 1, span]

    def read(self, layer: int, tokens: int, inflight_k: torch.Tensor, inflight_v: torch.Tensor):
        """Keys and values `[B, tokens + m, H, Dh]` (model dtype) for one layer: its first `tokens`
        committed slots dequantised, then the in-flight K/V `[B, m, H, Dh]` as they are."""
        end = tokens + inflight_k.shape[1]
        out = []
        for payload, scales, work, inflight in (
            (self.k, self.k_scale, self.work_k, inflight_k),
            (self.v, self.v_scale, self.work_v, inflight_v),
        ):
            dequantise(payload[layer, :, :tokens], scales[layer, :, :tokens], work[:, :tokens])
            work[:, tokens:end] = inflight
            out.append(work[:, :end])
        return out[0], out[1]
