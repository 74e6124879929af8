"""User errors at the loading depth stop with one line the entry points print, not a traceback:
unknown presets and devices, missing paths, weights that would not fit in memory.

pytest tests/models/test_loading_errors.py
"""

import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import loading, weight_paths
from engine.devices import SetupError, resolve_device
from engine.footprint import GIB, available_bytes
from engine.models import random_init
from engine.models.checkpoints.wan import CheckpointError
from engine.models.text_encoder import TextEncoder
from engine.models.vae import random_vae
from engine.weight_paths import WeightPaths
from launch import bench, presets
from launch.cli import USER_ERRORS


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# -- presets ---------------------------------------------------------------------------------------


def test_unknown_preset_is_a_one_line_user_error():
    with pytest.raises(USER_ERRORS) as info:
        presets.get_preset("self-forcing-13b")
    message = str(info.value)
    assert message.startswith("unknown preset 'self-forcing-13b'; choose from: demo, tiny-wan")
    assert isinstance(info.value, KeyError)  # still what a failed lookup raises


def test_presets_command_with_an_unknown_name(capsys):
    assert presets.main(["foo"]) == 2
    assert "unknown preset 'foo'" in _one_line_error(capsys)


@pytest.mark.parametrize("argv", [["speed", "--preset", "foo"], ["cascade-model", "--presets", "foo"]])
def test_bench_with_an_unknown_preset(capsys, argv):
    assert bench.main(argv) == 2
    assert "magi-1-tiny" in _one_line_error(capsys)


# -- devices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta"])
def test_unknown_device_names(name):
    with pytest.raises(SetupError, match=f"{name}.*cpu, cuda") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


def test_cuda_on_a_cpu_only_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(SetupError, match=r"--device cuda: this torch build .* has no CUDA support; use --device cpu"):
        resolve_device("cuda")


def test_cuda_build_without_a_visible_device(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match="no CUDA device is visible"):
        resolve_device("cuda:0")


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SetupError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_bench_with_an_unknown_device(capsys):
    assert bench.main(["speed", "--preset", "tiny-wan", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in _one_line_error(capsys)


# -- paths -----------------------------------------------------------------------------------------

TINY_WAN = presets.get_preset("tiny-wan")
CPU = torch.device("cpu")


@pytest.mark.parametrize("field", ["tokenizer", "text_encoder", "lora"])
def test_a_missing_path_is_refused_before_the_transformer_builds(field, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "new_model", lambda cfg: pytest.fail("built before the paths were checked"))
    weights = WeightPaths(**{field: tmp_path / "nonexistent"})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(SetupError, match=f"{flag} .*nonexistent: no such file or folder"):
        loading.build_model(TINY_WAN, weights, CPU, torch.float32)


def test_an_unused_tokenizer_is_said(tmp_path, caplog):
    demo = presets.get_preset("demo")
    with caplog.at_level(logging.WARNING, logger="engine.loading"):
        loading.build_text_encoder(demo, WeightPaths(tokenizer=tmp_path), CPU, torch.float32)
    assert (
        f"--tokenizer {tmp_path} is not used: preset demo encodes prompts with its own word vocabulary" in caplog.text
    )


# -- values of the other parts -------------------------------------------------------------------------


def _with_nan(state: dict, key: str) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[0] = float("nan")
    return state


def test_nan_in_a_vae_file(tmp_path):
    vae = random_vae(presets.TINY_VAE, seed=0)
    key = next(k for k, v in vae.state_dict().items() if v.is_floating_point())
    path = tmp_path / "vae.safetensors"
    save_file(_with_nan(vae.state_dict(), key), str(path))
    with pytest.raises(CheckpointError, match=rf"vae\.safetensors: tensor {key} has 1 NaN/inf"):
        loading.build_decoder(TINY_WAN, WeightPaths(vae=path), CPU)


def test_int8_vae_of_the_right_shapes(tmp_path):
    vae = random_vae(presets.TINY_VAE, seed=0)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.to(torch.int8) for k, v in vae.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: tensor .* is int8, not float32"):
        loading.build_decoder(TINY_WAN, WeightPaths(vae=path), CPU)


def test_nan_in_a_text_encoder_folder(tmp_path):
    original = TextEncoder.random(presets.TINY_TEXT.tiny, text_len=16, device="cpu")
    key = "encoder.final_layer_norm.weight"
    original.encoder.load_state_dict(_with_nan(original.encoder.state_dict(), key))
    original.encoder.save_pretrained(str(tmp_path / "text_encoder"))
    original.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    with pytest.raises(CheckpointError, match=f"tensor {key} has 1 NaN/inf"):
        loading.build_text_encoder(TINY_WAN, WeightPaths(text_encoder=tmp_path), CPU, torch.float32)


def _demo_copy(tmp_path, part: str, change) -> WeightPaths:
    """The shipped demo weights, with one file's tensors changed."""
    shipped = weight_paths.bundled_weights_dir("demo")
    for name in weight_paths.BUNDLED_FILES.values():
        shutil.copy(shipped / name, tmp_path / name)
    path = tmp_path / weight_paths.BUNDLED_FILES[part]
    save_file(change(load_file(str(path))), str(path))
    return WeightPaths.bundle(tmp_path)


def test_nan_in_the_demo_word_embedding(tmp_path):
    weights = _demo_copy(tmp_path, "text_encoder", lambda state: _with_nan(state, "words.weight"))
    with pytest.raises(CheckpointError, match=r"text_encoder\.safetensors: tensor words\.weight has 1 NaN/inf"):
        loading.build_text_encoder(presets.get_preset("demo"), weights, CPU, torch.float32)


def test_int8_demo_codec(tmp_path):
    weights = _demo_copy(tmp_path, "vae", lambda state: {**state, "basis": state["basis"].to(torch.int8)})
    with pytest.raises(CheckpointError, match=r"latent_codec\.safetensors: tensor basis is int8"):
        loading.build_decoder(presets.get_preset("demo"), weights, CPU)


def test_shipped_demo_weights_pass():
    demo = presets.get_preset("demo")
    loading.build_text_encoder(demo, WeightPaths(), CPU, torch.float32)
    loading.build_decoder(demo, WeightPaths(), CPU)
    assert loading.build_model(demo, WeightPaths(), CPU, torch.float32).dtype == torch.float32


# -- memory ----------------------------------------------------------------------------------------


def test_a_preset_too_big_for_the_free_memory_is_refused_before_allocating(monkeypatch):
    from launch import build, memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * GIB)
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated before the check"))
    sf = presets.get_preset("self-forcing-1.3b")
    with pytest.raises(SetupError) as info:
        build.build_session(sf, WeightPaths(random=True), CPU, torch.float32)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("preset self-forcing-1.3b needs ") and "(transformer 5.29 GiB + " in message, message
    assert "on cpu, which has 4.00 GiB: no set of the options (--kv-cache fp8, --weights fp8) fits" in message, message


def test_what_is_allocated_is_said_with_verbose(caplog):
    from launch.build import build_session

    with caplog.at_level(logging.INFO, logger="launch.build"):
        build_session(TINY_WAN, WeightPaths(), CPU, torch.float32)
    said = r"memory plan for tiny-wan on cpu: needs [\d.]+ [MG]iB \(transformer [\d.]+ MiB \+ text encoder [\d.]+ MiB"
    said += r" \+ .* \+ workspace 0.25 GiB\), budget [\d.]+ [MG]iB"
    assert re.search(said, caplog.text), caplog.text


def test_random_init_of_a_big_model_reports_progress(monkeypatch, caplog):
    monkeypatch.setattr(random_init, "SMALL_MODEL_PARAMS", 1)  # tiny-wan counts as big
    with caplog.at_level(logging.INFO, logger="engine.models.random_init"):
        loading.build_model(TINY_WAN, WeightPaths(), CPU, torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("random weights:")]
    assert len(lines) >= 5 and lines[-1].startswith(
        f"random weights: 100% of {presets.parameter_count(TINY_WAN):,} parameters"
    )


def test_free_memory_from_meminfo_and_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8388608 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_bytes(CPU, meminfo, cgroup) == 8 * GIB
    (cgroup / "memory.max").write_text(f"{4 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert available_bytes(CPU, meminfo, cgroup) == 3 * GIB  # the container's headroom is smaller
    (cgroup / "memory.max").write_text("max\n")
    assert available_bytes(CPU, meminfo, cgroup) == 8 * GIB
    assert available_bytes(CPU, tmp_path / "absent", tmp_path / "absent") is None
