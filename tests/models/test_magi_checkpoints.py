"""MAGI-1 checkpoints in the released layout load exactly (fp8 within its rounding); malformed
folders and files fail with a message that names the file and the problem.

pytest tests/models/test_magi_checkpoints.py
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import MagiConfig
from engine.models.checkpoints.magi import load_magi_weights, read_magi_checkpoint, save_magi_checkpoint
from engine.models.checkpoints.wan import CheckpointError
from engine.models.magi import MagiModel

# head_dim 32 holds the 6 * rope_bands = 24 rotary channels; 3 layers so that fp8 touches layer 1
TINY = dict(dim=64, ffn_dim=96, num_heads=2, kv_heads=1, num_layers=3, in_channels=4, out_channels=4)
TINY.update(text_dim=32, caption_len=8, freq_dim=32, rope_bands=4)
CONFIGS = {
    "gelu": MagiConfig(**TINY),
    "swiglu": MagiConfig(**TINY, gated_linear_unit=True),
    "half-channel vae": MagiConfig(**TINY, half_channel_vae=True, x_rescale_factor=0.1),
}
CFG = CONFIGS["gelu"]
FP8_LINEARS = ("q", "qx", "k", "v", "linear_fc1", "linear_proj", "linear_fc2")


def random_state(cfg: MagiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    model = MagiModel(cfg)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def meta_model(cfg: MagiConfig = CFG) -> MagiModel:
    with torch.device("meta"):
        return MagiModel(cfg)


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def weights():
    return random_state(CFG)


@pytest.fixture()
def variant(weights, tmp_path):
    """A base variant folder `<tmp>/inference_weight` with 3 shards."""
    return save_magi_checkpoint(weights, tmp_path / "inference_weight", shards=3)


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_loads_every_tensor(name, tmp_path):
    cfg = CONFIGS[name]
    expected = random_state(cfg, seed=1)
    folder = save_magi_checkpoint(expected, tmp_path / "inference_weight", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    model = meta_model(cfg)
    ckpt = load_magi_weights(model, folder)
    assert ckpt.layout == "magi" and len(ckpt.files) == 2
    assert_same(model.state_dict(), expected)


def test_every_path_form_reads_the_same_weights(weights, variant, tmp_path):
    single = tmp_path / "single" / "inference_weight.distill"
    single.mkdir(parents=True)
    save_file({"module." + k: v for k, v in weights.items()}, str(single / "model.safetensors"))
    paths = {
        "variant folder": (variant, None),
        "parent with one variant": (tmp_path / "single", None),
        "index json": (variant / "model.safetensors.index.json", None),
        "single file, module. prefix": (single / "model.safetensors", None),
        "parent, variant by suffix": (tmp_path / "single", "distill"),
        "parent, variant by folder name": (tmp_path / "single", "inference_weight.distill"),
    }
    for name, (path, chosen) in paths.items():
        assert_same(read_magi_checkpoint(path, variant=chosen).state, weights), name


def test_several_variants_need_a_choice(weights, tmp_path):
    for name in ("inference_weight.distill", "inference_weight.fp8.distill"):
        save_magi_checkpoint(weights, tmp_path / name, shards=1, fp8="fp8" in name)
    with pytest.raises(CheckpointError, match="inference_weight.distill, inference_weight.fp8.distill.*variant="):
        read_magi_checkpoint(tmp_path)
    assert read_magi_checkpoint(tmp_path, variant="distill").layout == "magi"
    assert read_magi_checkpoint(tmp_path, variant="fp8.distill").layout == "magi-fp8"
    with pytest.raises(CheckpointError, match=r"no variant folder inference_weight\.fp8 \(found: \['inference"):
        read_magi_checkpoint(tmp_path, variant="fp8")


# -- fp8 ---------------------------------------------------------------------------------------------


def test_fp8_round_trip_dequantizes_within_fp8_rounding(weights, tmp_path):
    folder = save_magi_checkpoint(weights, tmp_path / "inference_weight.fp8.distill", fp8=True)
    stored = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(str(shard)))
    # only the middle layer is quantised, in the released shapes
    fc2 = "videodit_blocks.layers.1.mlp.linear_fc2."
    assert stored[fc2 + "weight"].dtype == torch.float8_e4m3fn and stored[fc2 + "weight"].shape[0] == 1
    assert stored[fc2 + "smooth_scale"].shape == (1, CFG.ffn_dim) and stored[fc2 + "input_scale"].shape == (1,)
    assert stored["videodit_blocks.layers.1.self_attention.linear_qkv.q.input_scale"].shape == (CFG.dim,)
    assert "videodit_blocks.layers.0.mlp.linear_fc2.weight_scale" not in stored
    assert "videodit_blocks.layers.2.mlp.linear_fc2.weight_scale" not in stored

    model = meta_model()
    ckpt = load_magi_weights(model, tmp_path)
    assert ckpt.layout == "magi-fp8"
    loaded = model.state_dict()
    quantised = {k for k in weights if k.startswith("videodit_blocks.layers.1.") and k.split(".")[-2] in FP8_LINEARS}
    assert len(quantised) == len(FP8_LINEARS)
    for key, original in weights.items():
        assert loaded[key].dtype == original.dtype, key  # dense, in the dtype of the unquantised layers
        if key not in quantised:
            assert torch.equal(loaded[key], original), key
            continue
        # e4m3 keeps 3 mantissa bits: relative error <= 1/16, plus the subnormal step near zero
        tolerance = original.abs() / 15 + 1e-3 * original.abs().max()
        error = (loaded[key] - original).abs()
        assert (error <= tolerance).all(), f"{key}: max error {error.max():.3e}"
        assert 0 < error.mean() < 0.05 * original.abs().mean(), key


def test_fp8_weights_come_back_in_the_dtype_of_the_dense_layers(weights, tmp_path):
    # as released: bf16 transformer blocks, float32 embedders and output layer
    mixed = {k: v.bfloat16() if k.startswith("videodit_blocks.") else v for k, v in weights.items()}
    save_magi_checkpoint(mixed, tmp_path / "inference_weight.fp8", shards=1, fp8=True)
    state = read_magi_checkpoint(tmp_path).state
    assert state["videodit_blocks.layers.1.mlp.linear_fc2.weight"].dtype == torch.bfloat16
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in mixed.items()}


def test_malformed_fp8_weight_is_reported(weights, tmp_path):
    folder = save_magi_checkpoint(weights, tmp_path / "inference_weight.fp8", shards=1, fp8=True)
    shard = folder / "model-00001-of-00001.safetensors"
    state = load_file(str(shard))
    key = "videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale"
    state[key] = state[key][:, :-1]
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: .*linear_fc2.smooth_scale \(1, 95\)"):
        read_magi_checkpoint(folder)


def _fp8_shard(weights, tmp_path):
    folder = save_magi_checkpoint(weights, tmp_path / "inference_weight.fp8", shards=1, fp8=True)
    shard = folder / "model-00001-of-00001.safetensors"
    return folder, shard, load_file(str(shard))


FC2 = "videodit_blocks.layers.1.mlp.linear_fc2."


@pytest.mark.parametrize("scale", ["weight_scale", "smooth_scale"])
def test_bad_fp8_scale_is_caught_after_dequantising(weights, tmp_path, scale):
    folder, shard, state = _fp8_shard(weights, tmp_path)
    state[FC2 + scale] = (
        torch.zeros_like(state[FC2 + scale]) if scale == "smooth_scale" else state[FC2 + scale] * torch.nan
    )
    save_file(state, str(shard))  # a zero smooth_scale divides into inf; a NaN scale spreads
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {FC2}weight has .* NaN/inf"):
        load_magi_weights(meta_model(), folder)


def test_fp8_weight_without_its_scales_is_refused(weights, tmp_path):
    folder, shard, state = _fp8_shard(weights, tmp_path)
    for suffix in ("weight_scale", "input_scale", "smooth_scale"):
        del state[FC2 + suffix]
    state[FC2 + "weight"] = state[FC2 + "weight"][0]  # the dense shape, still fp8
    single = tmp_path / "single"
    single.mkdir()
    save_file(state, str(single / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {FC2}weight is float8_e4m3fn.*weight_scale"):
        load_magi_weights(meta_model(), single)


def test_int8_beside_a_weight_scale_is_refused(weights, tmp_path):
    folder, shard, state = _fp8_shard(weights, tmp_path)
    state[FC2 + "weight"] = state[FC2 + "weight"].float().to(torch.int8)
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=rf"{FC2}weight is int8 beside a weight_scale"):
        read_magi_checkpoint(folder)


# -- compressed shards --------------------------------------------------------------------------------


def _compress_shards(folder):
    for shard in folder.glob("*.safetensors"):
        subprocess.run(["zstd", "-q", "--rm", str(shard)], check=True)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd CLI to write .zst shards")
def test_zst_shards_load(weights, variant, tmp_path):
    _compress_shards(variant)
    assert sorted(p.name for p in variant.iterdir())[0] == "model-00001-of-00003.safetensors.zst"
    ckpt = read_magi_checkpoint(variant)
    assert_same(ckpt.state, weights)
    assert all(f.name.endswith(".safetensors.zst") for f in ckpt.files)
    single = tmp_path / "single"
    single.mkdir()
    save_file(weights, str(single / "model.safetensors"))
    _compress_shards(single)
    ckpt = read_magi_checkpoint(single)
    assert_same(ckpt.state, weights)
    assert [f.name for f in ckpt.files] == ["model.safetensors.zst"]


def test_zst_without_a_decompressor_says_how(weights, tmp_path, monkeypatch):
    folder = save_magi_checkpoint(weights, tmp_path / "inference_weight", shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.rename(shard.with_name(shard.name + ".zst"))  # content does not matter: nothing can open it
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CheckpointError, match=r"00002\.safetensors\.zst: .*`zstd -d .*model-00002-of-00002"):
        read_magi_checkpoint(folder)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd CLI")
def test_corrupt_zst_is_reported(weights, variant, monkeypatch):
    shard = variant / "model-00001-of-00003.safetensors"
    shard.rename(shard.with_name(shard.name + ".zst"))  # not zstd data
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(CheckpointError, match=r"00001-of-00003\.safetensors\.zst: zstd -d failed"):
        read_magi_checkpoint(variant)


# -- malformed inputs -----------------------------------------------------------------------------------


def _truncate(variant):
    shard = variant / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return r"model-00002-of-00003\.safetensors: cannot read safetensors file"


def _bad_json(variant):
    (variant / "model.safetensors.index.json").write_text('{"weight_map": ')
    return r"model\.safetensors\.index\.json: not a valid shard index"


def _missing_shard(variant):
    (variant / "model-00003-of-00003.safetensors").unlink()
    return r"index\.json: shard files missing.*model-00003-of-00003\.safetensors'"


def _phantom_key(variant):
    index = json.loads((variant / "model.safetensors.index.json").read_text())
    index["weight_map"]["videodit_blocks.layers.9.mlp.linear_fc1.weight"] = "model-00001-of-00003.safetensors"
    (variant / "model.safetensors.index.json").write_text(json.dumps(index))
    return r"index\.json: keys listed in the index are absent from the shards: .*layers\.9\.mlp"


def _set_tensor(variant, key, value):
    """Replace (or add, or with None remove) one tensor, keeping the index consistent."""
    index_path = variant / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = variant / index["weight_map"].get(key, "model-00001-of-00003.safetensors")
    state = load_file(str(shard))
    if value is None:
        del state[key], index["weight_map"][key]
    else:
        state[key] = value
        index["weight_map"][key] = shard.name
    save_file(state, str(shard))
    index_path.write_text(json.dumps(index))
    return shard.name


def _missing_key(variant):
    shard = _set_tensor(variant, "rope.bands", None)
    return rf"inference_weight \[magi; .*{shard}.*\] does not fit the model: missing keys: rope\.bands"


def _unexpected_key(variant):
    _set_tensor(variant, "pos_embed", torch.zeros(2))
    return r"does not fit the model: unexpected keys: pos_embed"


def _wrong_shape(variant):
    _set_tensor(variant, "rope.bands", torch.zeros(16))
    return r"shape mismatches: rope\.bands \(16,\) vs model \(4,\)"


FC1 = "videodit_blocks.layers.0.mlp.linear_fc1.weight"


def _int8_of_the_right_shape(variant):
    shard = _set_tensor(variant, FC1, torch.ones(CFG.ffn_dim, CFG.dim, dtype=torch.int8))
    return rf"{shard}: tensor {FC1} is int8, not float32, bfloat16, float16; .*unquantised"


def _nan_weight(variant):
    shard = _set_tensor(variant, FC1, torch.full((CFG.ffn_dim, CFG.dim), float("nan")))
    return (
        rf"{shard}: tensor {FC1} has {CFG.ffn_dim * CFG.dim:,} NaN/inf values of {CFG.ffn_dim * CFG.dim:,}; .*download"
    )


def _empty_folder(variant):
    for path in variant.iterdir():
        path.unlink()
    return r"inference_weight: no model\.safetensors\.index\.json, model\.safetensors or inference_weight\* folder"


BROKEN = [_truncate, _bad_json, _missing_shard, _phantom_key, _missing_key, _unexpected_key, _wrong_shape]
BROKEN += [_int8_of_the_right_shape, _nan_weight]


@pytest.mark.parametrize("breakage", BROKEN + [_empty_folder], ids=lambda f: f.__name__.strip("_"))
def test_malformed_checkpoints_raise_with_the_path(variant, breakage):
    message = breakage(variant)
    with pytest.raises(CheckpointError, match=message) as info:
        load_magi_weights(meta_model(), variant)
    assert "\n" not in str(info.value)


def test_bad_paths(variant, tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such file or folder"):
        read_magi_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="variant='distill' needs the folder"):
        read_magi_checkpoint(variant / "model.safetensors.index.json", variant="distill")
    backup = shutil.copy(variant / "model-00001-of-00003.safetensors", tmp_path / "weights.bak")
    with pytest.raises(CheckpointError, match=r"weights\.bak: expected a folder, .*index\.json or a \.safetensors"):
        read_magi_checkpoint(backup)


def test_another_size_does_not_fit(tmp_path):
    bigger = random_state(MagiConfig(**{**TINY, "num_layers": 4}))
    folder = save_magi_checkpoint(bigger, tmp_path / "inference_weight", shards=1)
    with pytest.raises(CheckpointError, match=r"unexpected keys: videodit_blocks\.layers\.3\."):
        load_magi_weights(meta_model(), folder)
