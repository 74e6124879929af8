"""User errors at the loading depth stop with one line the entry points print, not a traceback:
unknown presets and devices, missing paths, weights that would not fit in memory.

pytest tests/test_loading_errors.py
"""

import pytest
import torch

from engine.loading import SetupError, resolve_device
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
