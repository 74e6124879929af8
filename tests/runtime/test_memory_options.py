"""The options that make a preset fit a smaller device: streamed blocks, fp8 weights, the text
encoder off the device (engine/runtime/memory_options.py).

    pytest tests/runtime/test_memory_options.py

On a CPU the "device" copies of the streamed blocks are plain copies into separate slot tensors,
so what is checked is the mechanism: every block computes from a slot holding its values, never
from the host copy (parked blocks are on the meta device, where a read fails), and the output is
bit-equal to the resident run.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, SpeedConfig
from engine.runtime import fp8_weights
from engine.runtime.fp8 import UNIT_ROUNDOFF
from engine.runtime.fp8_weights import Fp8Linear, blocks_bytes, output_bound, roundtrip_bound, stored_bytes
from engine.runtime.streamed_layers import StreamedBlocks, stream_blocks
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.pipeline import StreamingPipeline
from launch.presets import get_preset

CPU = torch.device("cpu")


def _session(name: str, **speed):
    return build_session(get_preset(name), WeightPaths(seed=3), CPU, torch.float32, speed=SpeedConfig(**speed))


def _latents(session, blocks: int = 3, prompt="a red circle moving left") -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([b.latents for b in session.run(prompt, blocks=blocks, seed=0)], dim=2)


def _slot_storage(streamed: StreamedBlocks) -> set[int]:
    return {t.data_ptr() for slot in streamed._slots for t in slot}


@pytest.mark.parametrize("name", ["tiny-wan", "demo"])
def test_streamed_blocks_equal_the_resident_run(name):
    """Bit-equal latents; each streamed block computes from a slot (a pre-hook checks every
    parameter) and is parked on the meta device outside its turn; one copy per block and forward."""
    resident = _latents(_session(name))
    session = _session(name, offload="layers")
    streamed = session.executors.memory.streamed
    seen = []

    def in_a_slot(block, args):
        params = list(block.parameters())
        seen.append(all(p.data_ptr() in _slot_storage(streamed) for p in params))

    handles = [block.register_forward_pre_hook(in_a_slot) for block in list(streamed._modules.values())[1:]]
    offloaded = _latents(session)
    for handle in handles:
        handle.remove()
    assert torch.equal(offloaded, resident), f"max diff {(offloaded - resident).abs().max():.3g}"
    assert seen and all(seen), "a streamed block computed from memory outside the slots"
    parked = [p for block in list(streamed._modules.values())[1:] for p in block.parameters()]
    assert all(p.is_meta for p in parked), "a streamed block kept its weights between turns"
    streamed_blocks = len(streamed) - 1
    forwards = session.executors.memory.streamed.copies // streamed_blocks
    assert streamed.copies >= streamed_blocks * forwards > 0
    assert "offload: " in session.executors.speed_line


def test_every_block_streamed_through_two_slots_is_exact():
    """resident=0 on tiny-wan's model: both blocks take turns in the two slots, over several
    forwards of the model's own loops (the forward and embed_text)."""
    session = _session("tiny-wan")
    model = session.model
    reference = _latents(session)
    streamed = stream_blocks(model, CPU, resident=0)
    session.prompts._text_kv.clear()  # embed_text streams the blocks too
    assert torch.equal(_latents(session), reference)
    assert streamed.slot_bytes * 1 == sum(t.numel() * t.element_size() for t in streamed._host[0]) * 2


def test_fp8_linears_stay_within_the_e4m3_bound():
    """Every fp8 Linear of tiny-wan, on the inputs a real forward gives it: |y8 - y| <=
    sum_j |x_j| max(2^-4 |w_ij|, 2^-10 s_i) (e4m3 rounds to half a step of 3 mantissa bits; s_i
    the row's scale), plus float32 summation slack. The stream's latents then stay within a
    relative RMS of 2^-4, the per-weight bound, of the native run."""
    native = _session("tiny-wan")
    session = _session("tiny-wan", weights="fp8")
    originals = dict(native.model.blocks.named_modules())
    checked = []

    def check(name):
        def hook(layer, args, out):
            x = args[0]
            original = originals[name]
            bound = output_bound(x, original.weight, layer.weight_scale) + 1e-5 * (x.abs() @ original.weight.abs().T)
            excess = ((out - original(x)).abs() - bound).max().item()
            checked.append((name, excess))

        return hook

    fp8 = [(n, m) for n, m in session.model.blocks.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 10 * len(session.model.blocks)  # q, k, v, o twice and the FFN's two
    handles = [m.register_forward_hook(check(n)) for n, m in fp8]
    latents = _latents(session)
    for handle in handles:
        handle.remove()
    assert checked and max(e for _, e in checked) <= 0, max(checked, key=lambda c: c[1])
    reference = _latents(native)
    relative = ((latents - reference).norm() / reference.norm()).item()
    assert 0 < relative < UNIT_ROUNDOFF, relative
    assert "weights: fp8 (arcade e4m3)" in session.executors.speed_line


def test_fp8_weights_are_stored_in_a_byte():
    """Payload e4m3, a scale per output channel, every element within e4m3's rounding; the bytes
    counted on a native model (what a memory plan reads) equal those the quantised blocks hold."""
    session = _session("tiny-wan", weights="fp8")
    native = _session("tiny-wan").model.blocks
    assert blocks_bytes(native, "fp8") == stored_bytes(session.model.blocks) < blocks_bytes(native, "native")
    layer = session.model.blocks[0].ffn[0]
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (layer.out_features, 1)
    weight = _session("tiny-wan").model.blocks[0].ffn[0].weight
    error = (layer.dequantised() - weight).abs()
    assert (error <= roundtrip_bound(weight, layer.weight_scale)).all(), error.max()
    assert error.max() > 0 and layer.weight_scale.flatten().unique().numel() == layer.out_features


def test_the_python_api_takes_the_memory_options():
    pipe = StreamingPipeline.from_preset("tiny-wan", random_weights=True, device="cpu", weights="fp8",
                                         offload="layers", text_encoder_device="cpu")  # fmt: skip
    line = pipe.speed_line
    assert "weights: fp8" in line and "offload: 1 of 2 blocks" in line and "text encoder: on the host" in line, line
    assert pipe.generate("a red circle", blocks=1).frames.shape[0] > 0


def test_fp8_and_compile_with_offload_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="--compile off with --offload layers") as refused:
        SpeedConfig(offload="layers", compile="default")
    assert "\n" not in str(refused.value)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    why = fp8_weights.refusal(CPU)
    assert why.startswith("--weights fp8 needs torch's float8 dtypes") and "\n" not in why


@pytest.mark.parametrize("where", ["cpu", "swap"])
def test_text_encoder_off_the_device(where):
    """cpu: the encoder stays on the host. swap: its weights stay on the host and are copied for
    each new prompt only (the cache answers a repeated one), then dropped. Same latents."""
    reference = _latents(_session("tiny-wan"))
    session = _session("tiny-wan", text_encoder_device=where)
    encoder = session.prompts.encoder
    assert torch.equal(_latents(session), reference)
    assert all(p.device == CPU for p in encoder.network.parameters())
    if where == "swap":
        kept = [p.data_ptr() for p in encoder.network.parameters()]
        assert encoder.swaps == 1
        _latents(session)  # the same prompt: cached
        assert encoder.swaps == 1
        _latents(session, prompt="a blue square moving up")
        assert encoder.swaps == 2 and [p.data_ptr() for p in encoder.network.parameters()] == kept
