"""Checkpoints load tensor by tensor: the same weights as reading them whole, checked before any
value is read, LoRA merged as they stream, and a load's host memory is one tensor, not the model.

pytest tests/models/test_streaming_load.py
"""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine import loading
from engine.models.checkpoints import streaming
from engine.models.checkpoints.lora import merge_lora
from engine.models.checkpoints.magi import load_magi_weights, save_magi_checkpoint
from engine.models.checkpoints.wan import CheckpointError, check_fit, load_weights, read_checkpoint
from engine.models.magi import MagiModel
from engine.models.wan import WanModel
from engine.weight_paths import WeightPaths
from helpers import tiny_model, write_wan_shards
from launch import presets
from launch.benchmarks.load import config, measure, write_checkpoint

TINY_WAN = presets.get_preset("tiny-wan")
CPU = torch.device("cpu")
MB = 2**20


def _meta(cfg=TINY_WAN.model, family=WanModel):
    with torch.device("meta"):
        return family(cfg)


def _whole(path, dtype, lora=None):
    """The model as loading did before streaming: whole state dict, assigned, (LoRA,) cast."""
    model, ckpt = _meta(), read_checkpoint(path)
    check_fit(model, ckpt)
    model.load_state_dict(ckpt.state, strict=True, assign=True)
    if lora is not None:
        merge_lora(model, lora)
    return model.cast(dtype)


def _assert_same_weights(model, expected, what):
    expected = expected.state_dict()
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu", f"{what}: {key} left on {value.device}"
        assert value.dtype == expected[key].dtype, f"{what}: {key} {value.dtype} vs {expected[key].dtype}"
        assert torch.equal(value, expected[key]), f"{what}: {key} max diff {(value - expected[key]).abs().max()}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_wan_shards(tiny_model(seed=3, cfg=TINY_WAN.model), tmp_path_factory.mktemp("shards") / "wan", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_equal_the_whole_load(shards, dtype):
    """The same cast of the same values, one tensor at a time: bit for bit, float32-kept params included."""
    model = _meta().cast(dtype)
    load_weights(model, shards, device=CPU, dtypes="model")
    _assert_same_weights(model, _whole(shards, dtype), f"streamed to {dtype}")
    assert model.blocks[0].ffn[0].weight.dtype == dtype and model.blocks[0].modulation.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())  # Parameters, as load_state_dict leaves them


def test_build_model_streams_a_checkpoint_and_merges_lora_as_it_goes(shards, tmp_path):
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        out_features, in_features = _meta().get_parameter(f"{module}.weight").shape
        adapters[f"{module}.lora_A.weight"] = torch.randn(4, in_features, generator=generator)
        adapters[f"{module}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator)
    lora = tmp_path / "lora.safetensors"
    save_file(adapters, str(lora))
    for dtype in (torch.float32, torch.bfloat16):
        built = loading.build_model(TINY_WAN, WeightPaths(checkpoint=shards, lora=lora), CPU, dtype)
        # float32 files: merging in float32 before the cast is what merging after the load did
        _assert_same_weights(built, _whole(shards, dtype, lora), f"build_model with LoRA, {dtype}")
        assert not torch.equal(built.blocks[0].self_attn.q.weight, _whole(shards, dtype).blocks[0].self_attn.q.weight)


def test_keys_shapes_and_dtypes_are_refused_before_any_value_is_read(shards, tmp_path, monkeypatch):
    state = tiny_model(seed=3, cfg=TINY_WAN.model).state_dict()
    broken = {
        "missing keys": {k: v for k, v in state.items() if k != "head.head.bias"},
        "shape mismatches": {**state, "head.head.bias": torch.zeros(3)},
        "is int8": {**state, "head.head.weight": state["head.head.weight"].to(torch.int8)},
    }
    monkeypatch.setattr(streaming, "_read_one", lambda path, key: pytest.fail(f"read {key} before the check"))
    for problem, tensors in broken.items():
        path = tmp_path / "broken.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        with pytest.raises(CheckpointError, match=problem):
            load_weights(_meta(), path, dtypes="model")


def test_a_bad_value_stops_the_stream_naming_its_file(shards, tmp_path):
    state = {k: v.clone() for k, v in tiny_model(seed=3, cfg=TINY_WAN.model).state_dict().items()}
    state["blocks.1.ffn.2.weight"][0, 0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"diverged\.safetensors: tensor blocks\.1\.ffn\.2\.weight has 1 NaN/inf"):
        load_weights(_meta(), path, dtypes="model")


def test_magi_streams_into_the_dtypes_of_its_cast(tmp_path):
    cfg = presets.get_preset("magi-1-tiny").model
    expected = {k: torch.randn(v.shape) for k, v in _meta(cfg, MagiModel).state_dict().items()}
    folder = save_magi_checkpoint(expected, tmp_path / "inference_weight", shards=2)
    model = _meta(cfg, MagiModel).cast(torch.bfloat16)
    load_magi_weights(model, folder, device=CPU, dtypes="model")
    reference = MagiModel(cfg)
    reference.load_state_dict(expected)
    _assert_same_weights(model, reference.cast(torch.bfloat16), "magi streamed to bfloat16")


# -- host memory: the 14B layout, in a fresh process per way ---------------------------------------------


@pytest.fixture(scope="module")
def wan_14b_layout(tmp_path_factory):
    """Wan2.1-14B's diffusers layout (sharded safetensors + index, 14B key names and head_dim 128)
    at a quarter of its width with 8 blocks: 371 MB in 4 shards of at most 100 MB, bfloat16."""
    cfg = config(layers=8, width=4)
    folder = tmp_path_factory.mktemp("wan14b") / "transformer"
    sizes = write_checkpoint(cfg, folder, shard_mb=100, dtype=torch.bfloat16)
    yield cfg, folder, sizes
    shutil.rmtree(folder, ignore_errors=True)


def test_a_load_holds_one_tensor_not_the_checkpoint(wan_14b_layout):
    """Loaded to the CPU and cast to float32, so the model itself is on the host: `transient` is the
    peak RSS growth beyond the model's own bytes, the host memory a GPU load would need."""
    cfg, folder, sizes = wan_14b_layout
    assert sizes["files"] == 4 and sizes["total_mb"] > 3 * sizes["largest_shard_mb"]
    bound = 2 * sizes["largest_tensor_mb"] + 32  # the tensor read, its cast copy, allocator slack
    streamed = measure(folder, cfg, "streamed", "cpu", "float32")
    whole = measure(folder, cfg, "whole", "cpu", "float32")
    assert streamed["transient_mb"] < bound, f"streamed: {streamed}; bound {bound:.0f} MB; checkpoint {sizes}"
    # the bound is one the loader before streaming fails: it held the whole checkpoint while casting
    assert whole["transient_mb"] > max(bound, 0.5 * sizes["total_mb"]), f"whole: {whole}; checkpoint {sizes}"
    assert streamed["kept_mb"] == pytest.approx(streamed["model_on_host_mb"], abs=32), streamed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_load_keeps_nothing_on_the_host(wan_14b_layout):
    cfg, folder, sizes = wan_14b_layout
    streamed = measure(folder, cfg, "streamed", "cuda", "bfloat16")
    assert streamed["model_on_host_mb"] == 0
    assert streamed["peak_growth_mb"] < 2 * sizes["largest_tensor_mb"] + 64, f"{streamed}; checkpoint {sizes}"
