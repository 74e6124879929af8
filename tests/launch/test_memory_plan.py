"""The memory plan counts what loads: its bytes equal the tensors a built session holds (tiny and
mid presets), the real-size presets' plans equal their meta-device counts, a budget that cannot fit
is refused in one line before loading, and a smaller card admits fewer sessions.

pytest tests/launch/test_memory_plan.py
"""

from __future__ import annotations

import pytest
import torch

from engine.config import SpeedConfig
from engine.devices import SetupError
from engine.footprint import GIB, parse_bytes, size
from engine.loading import build_decoder, new_model
from engine.sampling.noise import NoiseSource
from engine.serving.scheduler import Limits
from engine.serving.sessions import Opened, Refused, SessionManager
from engine.weight_paths import WeightPaths
from launch import generate, presets
from launch.build import Assembly, build_session
from launch.fit import gpu_counts
from launch.memory import MemoryPlan, Options, cheapest, count
from launch.stream import parse_args, session_limits

CPU = torch.device("cpu")


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@pytest.mark.parametrize("name", ["tiny-wan", "mid-wan"])
def test_the_plan_counts_what_a_session_allocates(name):
    torch.set_grad_enabled(False)
    preset = presets.get_preset(name)
    counts = count(preset, WeightPaths(), torch.float32, "cpu")
    session = build_session(preset, WeightPaths(), CPU, torch.float32)
    decoder = session.decoder
    assert counts.transformer.total == tensor_bytes(session.model)
    assert counts.text_encoder == tensor_bytes(session.prompts.encoder.encoder)
    assert counts.vae["float32"] == tensor_bytes(decoder.vae) + decoder.mean.nbytes + decoder.std.nbytes
    executor = session.executors(NoiseSource(0), blocks_in_forward=1)  # a sequential plan: one block per forward
    assert counts.kv["model"] == executor.cache.nbytes > 0  # the cache the executor allocated
    fp8 = Assembly(preset, session.model, CPU, speed=SpeedConfig(kv_cache="fp8"))(NoiseSource(0), blocks_in_forward=1)
    assert counts.kv["fp8"] == fp8.cache.nbytes  # scales and a working buffer: fp8 wins at real sizes only
    if name == "tiny-wan":  # the decoder's causal cache after two blocks (decoding mid-wan's takes too long)
        assert len(list(session.run("a red circle moving left", blocks=2, seed=0).frames())) == 2
        state = sum(t.nbytes for t in decoder._feat_map if isinstance(t, torch.Tensor))
        assert counts.decode_state["float32"] == state > 0
        check_the_options_as_built(preset, counts)
        bf16 = build_decoder(preset, WeightPaths(), CPU, torch.bfloat16)  # --vae-dtype bfloat16: built, not run
        assert counts.vae["bfloat16"] == tensor_bytes(bf16.vae) + bf16.mean.nbytes + bf16.std.nbytes
        assert 2 * counts.decode_state["bfloat16"] == state  # the cache is made at the weights' dtype


def check_the_options_as_built(preset, counts):
    """fp8 blocks streamed from the host: the resident part (the rest, block 0, two slots) and
    the host part are what the plan says (on a CPU the slots are plain tensors)."""
    speed = SpeedConfig(weights="fp8", offload="layers")
    model = build_session(preset, WeightPaths(), CPU, torch.float32, speed=speed).model
    streamed = model.blocks
    resident = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
    device = sum(t.numel() * t.element_size() for t in resident.values()) + streamed.slot_bytes
    [part] = [
        p for p in MemoryPlan(counts, Options(weights="fp8", offload="layers"), None).parts if p.name == "transformer"
    ]
    assert (part.device, part.host) == (device, streamed.host_bytes), (part, device, streamed.host_bytes)
    assert part.device + part.host < counts.transformer.total  # fp8 saved


def test_the_real_size_plans_equal_their_meta_counts():
    preset = presets.get_preset("wan-14b-causal")
    counts = gpu_counts(preset)  # bfloat16, the real checkpoints
    with torch.device("meta"):
        model = new_model(preset.model).cast(torch.bfloat16)
    assert counts.transformer.total == tensor_bytes(model)
    assert (
        counts.transformer.params == presets.parameter_count(preset)
        and f"{counts.transformer.params:.3g}" == "1.43e+10"
    )
    assert counts.kv["model"] == presets.kv_cache_bytes(preset) and f"{counts.kv['model'] / GIB:.1f}" == "25.0"
    assert f"{counts.kv['fp8'] / GIB:.1f}" == "15.2"
    assert counts.text_encoder == 2 * 5_680_910_336  # umT5-XXL's parameters at bfloat16
    plan = cheapest(counts, 32 * GIB)  # the target: a 32 GB card
    assert plan is not None and plan.needed <= 32 * GIB and plan.options.offload == "layers", plan
    assert cheapest(counts, 16 * GIB) is None and MemoryPlan(counts, Options(), 80 * GIB).fits
    small = cheapest(gpu_counts(presets.get_preset("self-forcing-1.3b")), 12 * GIB)  # the target: a 12 GB card
    assert small is not None and small.options.vae == "bfloat16" and small.options.offload == "none", small


def test_an_impossible_gpu_memory_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    code = generate.main(["--preset", "tiny-wan", "--gpu-memory", "1MiB", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: preset tiny-wan needs ") and "\n" not in err, err
    assert "on cpu, which has 1.0 MiB: no set of the options (--kv-cache fp8, --weights fp8) fits" in err, err
    assert err.endswith("use a device with more memory or a smaller preset"), err
    # a budget the fp8 KV cache fits: the line names that flag, and nothing was allocated
    mid = presets.get_preset("mid-wan")
    counts = count(mid, WeightPaths(), torch.float32, "cpu")
    as_is, kv8 = (MemoryPlan(counts, Options(kv_cache=kv), None).needed for kv in ("model", "fp8"))
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(SetupError) as refused:
        build_session(mid, WeightPaths(), CPU, torch.float32, gpu_memory=(as_is + kv8) // 2)
    message = str(refused.value)
    assert "\n" not in message and f": with --kv-cache fp8 it needs {size(kv8)} and fits" in message, message
    assert presets.main(["--fit", "tiny-wan", "--gpu-memory", "12GiB"]) == 0  # the plan, as a table
    shown = capsys.readouterr().out
    assert "| KV cache | " in shown and "fits as is" in shown, shown
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("24GB") == 24 * 10**9 and parse_bytes("512MiB") == 2**29


def test_a_smaller_card_admits_fewer_sessions():
    torch.set_grad_enabled(False)
    demo = presets.get_preset("demo")
    session = build_session(demo, WeightPaths(), CPU, torch.float32)
    counts = count(demo, WeightPaths(), torch.float32, "cpu")
    one = MemoryPlan(counts, Options(), None)
    fixed, per, act = one.needed - one.per_session, one.per_session, counts.activations
    admitted = []
    for budget in (fixed + 2 * per + act + per // 2, fixed + 5 * per + 3 * act + per // 2):  # 2, then 5 sessions
        plan = MemoryPlan(counts, Options(), budget)
        limits = session_limits(parse_args([]), plan)  # --session-batch 4: 4 sessions' activations at once
        manager = SessionManager(session, limits, clock=lambda: 0.0)
        assert manager.kv_per_session == counts.kv["model"] and limits.kv_budget_bytes == plan.sessions(4) * per_kv(
            counts
        )
        opened = [manager.open("a red circle moving left", seed) for seed in range(8)]
        admitted.append(sum(isinstance(o, Opened) for o in opened))
        assert "KV memory is full" in next(o for o in opened if isinstance(o, Refused)).reason
    assert admitted == [2, 5]
    given = session_limits(parse_args(["--session-memory", "64"]), plan)  # the explicit override wins
    assert given.kv_budget_bytes == 64 << 20 and Limits.batch == 4


def per_kv(counts) -> int:
    return counts.kv["model"]
