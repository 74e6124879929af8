"""Checkpoint layouts load to the same weights; every malformed case fails with a clear message.

pytest tests/models/test_checkpoints.py
"""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from engine.models.checkpoints.lora import merge_lora
from engine.models.checkpoints.wan import (
    CheckpointError,
    diffusers_to_wan,
    load_weights,
    read_checkpoint,
    wan_to_diffusers,
)
from engine.models.wan import WanModel
from helpers import (
    TINY,
    diffusers_twin,
    tiny_model,
    write_diffusers_folder,
    write_self_forcing_pt,
    write_wan_safetensors,
    write_wan_shards,
)


@pytest.fixture(scope="module")
def source():
    return tiny_model(seed=11)


@pytest.fixture(scope="module")
def layouts(source, tmp_path_factory):
    """The same weights written in every supported layout."""
    root = tmp_path_factory.mktemp("layouts")
    pipeline_root = root / "Wan2.1-T2V-tiny-Diffusers"
    write_diffusers_folder(source, pipeline_root / "transformer", "40KB")
    return {
        "diffusers folder (sharded)": root / "Wan2.1-T2V-tiny-Diffusers" / "transformer",
        "diffusers pipeline root": pipeline_root,
        "diffusers single file": write_diffusers_folder(source, root / "single"),
        "wan safetensors": write_wan_safetensors(source, root / "wan.safetensors"),
        "wan safetensors, model. prefix (Krea)": write_wan_safetensors(source, root / "krea.safetensors", "model."),
        "wan shards + index": write_wan_shards(source, root / "wan_shards"),
        "wan .pth": _save_pth(source, root / "wan.pth"),
        "self-forcing .pt": write_self_forcing_pt(source, root / "self_forcing_dmd.pt"),
    }


def _save_pth(model, path):
    torch.save(model.state_dict(), str(path))
    return path


def _meta_model():
    with torch.device("meta"):
        return WanModel(TINY)


def test_every_layout_loads_the_same_weights(source, layouts):
    expected = source.state_dict()
    for name, path in layouts.items():
        model = _meta_model()
        ckpt = load_weights(model, path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}: {key} differs"
        assert ckpt.files, name


def test_layouts_are_detected(layouts):
    assert read_checkpoint(layouts["diffusers folder (sharded)"]).layout == "diffusers"
    assert read_checkpoint(layouts["wan shards + index"]).layout == "wan"
    assert read_checkpoint(layouts["self-forcing .pt"]).layout == "self-forcing:generator_ema"
    assert read_checkpoint(layouts["self-forcing .pt"], ema=False).layout == "self-forcing:generator"


def test_self_forcing_ema_choice(source, tmp_path):
    other = tiny_model(seed=12)
    path = write_self_forcing_pt(source, tmp_path / "sf.pt", ema=other)
    ema, plain = _meta_model(), _meta_model()
    load_weights(ema, path)  # EMA preferred by default
    load_weights(plain, path, ema=False)
    assert torch.equal(ema.head.head.weight, other.head.head.weight)
    assert torch.equal(plain.head.head.weight, source.head.head.weight)


def test_key_maps_are_inverse_and_cover_diffusers():
    diffusers_keys = list(diffusers_twin(TINY).state_dict())
    ours = set(WanModel(TINY).state_dict())
    assert {diffusers_to_wan(k) for k in diffusers_keys} == ours
    assert all(wan_to_diffusers(diffusers_to_wan(k)) == k for k in diffusers_keys)
    assert diffusers_to_wan("blocks.3.norm2.weight") == "blocks.3.norm3.weight"  # the swap


# -- malformed checkpoints ---------------------------------------------------------------------


def _state(source):
    return {k: v.clone() for k, v in source.state_dict().items()}


def _expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_weights(_meta_model(), path)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message}"
    for fragment in (str(path.name), *fragments):
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_missing_key(source, tmp_path):
    state = _state(source)
    del state["blocks.1.cross_attn.k.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    _expect_error(tmp_path / "missing.safetensors", "missing keys", "blocks.1.cross_attn.k.weight")


def test_unexpected_key(source, tmp_path):
    state = _state(source)
    state["blocks.0.img_emb.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    _expect_error(tmp_path / "extra.safetensors", "unexpected keys", "blocks.0.img_emb.weight")


def test_shape_mismatch(source, tmp_path):
    state = _state(source)
    state["head.head.weight"] = torch.zeros(8, TINY.dim)
    save_file(state, str(tmp_path / "shape.safetensors"))
    _expect_error(tmp_path / "shape.safetensors", "shape mismatches", "head.head.weight (8, 32)")


def test_wrong_model_size_names_file_and_keys(tmp_path):
    """A 1.3B-shaped file against a different config fails on shapes, not on silence."""
    bigger = WanModel(TINY.__class__(**{**TINY.__dict__, "ffn_dim": 96}))
    path = write_wan_safetensors(bigger, tmp_path / "bigger.safetensors")
    _expect_error(path, "blocks.0.ffn.0.weight (96, 32) vs model (64, 32)")


def test_other_model_size_is_named(tmp_path):
    wider = WanModel(TINY.__class__(**{**TINY.__dict__, "dim": 48, "num_heads": 3, "num_layers": 3}))
    path = write_wan_safetensors(wider, tmp_path / "wider.safetensors")
    _expect_error(path, "looks like dim 48, 3 layers; the preset has dim 32, 2 layers")


def test_truncated_safetensors(layouts, tmp_path):
    data = layouts["wan safetensors"].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "cannot read safetensors")


def test_truncated_torch_file(layouts, tmp_path):
    data = layouts["self-forcing .pt"].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 3])
    _expect_error(path, "cannot read torch checkpoint")


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"GGUF")
    _expect_error(path, "unknown checkpoint format")


def test_missing_path_and_empty_folder(tmp_path):
    _expect_error(tmp_path / "nowhere.safetensors", "no such file")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "expected one *.safetensors")


def test_missing_shard(source, tmp_path):
    folder = write_wan_shards(source, tmp_path / "shards")
    next(folder.glob("*-00002-of-*.safetensors")).unlink()
    _expect_error(folder, "shard files missing")


def test_index_lists_absent_keys(source, tmp_path):
    folder = write_wan_shards(source, tmp_path / "shards")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.9.phantom"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    _expect_error(folder, "absent from the shards", "blocks.9.phantom")


def test_self_forcing_without_requested_entry(source, tmp_path):
    path = tmp_path / "generator_only.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in source.state_dict().items()}}, str(path))
    with pytest.raises(CheckpointError, match="no 'generator_ema' entry"):
        read_checkpoint(path, ema=True)
    assert read_checkpoint(path).layout == "self-forcing:generator"  # default falls back


def test_non_tensor_entries(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"blocks.0.self_attn.q.weight": [1, 2, 3]}, str(path))
    _expect_error(path, "not tensors")


def test_int8_weights_of_the_right_shapes(source, tmp_path):
    """A quantised export passes every key and shape check; its dtype must stop it."""
    path = tmp_path / "int8.safetensors"
    save_file({k: v.to(torch.int8) for k, v in _state(source).items()}, str(path))
    _expect_error(path, "is int8", "unquantised")


def test_int8_names_the_key_as_stored_in_the_file(source, tmp_path):
    state = {f"model.{k}": v for k, v in _state(source).items()}
    state["model.blocks.1.ffn.2.weight"] = state["model.blocks.1.ffn.2.weight"].to(torch.int8)
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": state}, str(path))
    _expect_error(path, "tensor model.blocks.1.ffn.2.weight is int8")


def test_stray_fp8_weight_is_refused(source, tmp_path):
    state = _state(source)
    state["head.head.weight"] = state["head.head.weight"].to(torch.float8_e4m3fn)
    save_file(state, str(tmp_path / "fp8.safetensors"))
    _expect_error(tmp_path / "fp8.safetensors", "head.head.weight is float8_e4m3fn", "weight_scale")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(source, tmp_path, value):
    state = _state(source)
    state["blocks.0.self_attn.v.weight"][3, 5] = value
    path = tmp_path / "diverged.pth"
    torch.save(state, str(path))
    _expect_error(path, "blocks.0.self_attn.v.weight has 1 NaN/inf values of 1,024", "download or export it again")


def test_nan_in_a_shard_names_the_shard_and_key(source, tmp_path):
    state = _state(source)
    state["time_embedding.0.bias"][0] = float("nan")
    folder = write_wan_shards(_model_with(state), tmp_path / "shards")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = index["weight_map"]["time_embedding.0.bias"]
    _expect_error(folder, f"{shard}: tensor time_embedding.0.bias has 1 NaN/inf")


def test_diffusers_file_is_named_with_its_own_key(source, tmp_path):
    state = _state(source)
    state["time_embedding.0.bias"][0] = float("nan")
    folder = write_diffusers_folder(_model_with(state), tmp_path / "diffusers")
    _expect_error(folder, "condition_embedder.time_embedder.linear_1.bias has 1 NaN/inf")


def _model_with(state):
    model = WanModel(TINY)
    model.load_state_dict(state)
    return model


def test_pickled_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    path = tmp_path / "payload.pt"
    torch.save({"blocks.0.self_attn.q.weight": Payload()}, str(path))
    _expect_error(path, "pickled Python objects", "makedirs", "state_dict")
    assert not marker.exists()


def test_garbage_torch_file_is_one_line_without_warnings(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x04garbage" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning would be a second message
        _expect_error(path, "cannot read torch checkpoint", "download it again")


# -- LoRA --------------------------------------------------------------------------------------


def test_lora_merge_adds_scaled_product(source, tmp_path):
    rank, alpha = 4, 8.0
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        out_features, in_features = source.get_parameter(f"{module}.weight").shape
        adapters[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        adapters[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": adapters}, str(path))
    model = tiny_model(seed=11)
    assert merge_lora(model, path, alpha=alpha) == 2
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        a = adapters[f"base_model.model.{module}.lora_A.weight"]
        b = adapters[f"base_model.model.{module}.lora_B.weight"]
        expected = source.get_parameter(f"{module}.weight") + (alpha / rank) * b @ a
        assert torch.allclose(model.get_parameter(f"{module}.weight"), expected, atol=1e-5), module
    assert torch.equal(model.blocks[0].self_attn.k.weight, source.blocks[0].self_attn.k.weight), "untouched layer"


def test_lora_for_unknown_module_fails(tmp_path):
    path = tmp_path / "bad_lora.safetensors"
    save_file(
        {"blocks.0.nope.lora_A.weight": torch.zeros(2, 3), "blocks.0.nope.lora_B.weight": torch.zeros(3, 2)}, str(path)
    )
    with pytest.raises(CheckpointError, match="blocks.0.nope"):
        merge_lora(tiny_model(), path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_lora_values_are_checked_before_merging(tmp_path, dtype):
    down = torch.ones(2, TINY.dim).to(dtype)
    up = torch.full((TINY.dim, 2), float("nan") if dtype.is_floating_point else 1.0).to(dtype)
    path = tmp_path / "lora.safetensors"
    prefix = "transformer.blocks.0.self_attn.q"  # diffusers style: the message names the stored key
    save_file({f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}, str(path))
    model = tiny_model()
    before = model.blocks[0].self_attn.q.weight.clone()
    problem = r"A\.weight is int8" if dtype == torch.int8 else r"B\.weight has 64 NaN/inf"
    with pytest.raises(CheckpointError, match=rf"lora\.safetensors: tensor {prefix}\.lora_{problem}"):
        merge_lora(model, path)
    assert torch.equal(model.blocks[0].self_attn.q.weight, before)
