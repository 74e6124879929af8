"""--attention-backend: chosen once from what the device offers (faked here), applied around the
forward by the runtime; the math kernel gives the default's output on CPU.

pytest tests/runtime/test_attention_backends.py
"""

import dataclasses

import pytest
import torch

from engine.config import ConfigError, SpeedConfig
from engine.runtime.backends import DeviceCaps, choose_attention
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset

H200 = DeviceCaps("cuda", capability=(9, 0), flash=True, efficient=True, cudnn=True)
A100 = DeviceCaps("cuda", capability=(8, 0), flash=True, efficient=True, cudnn=True)
CPU = DeviceCaps("cpu")


def test_auto_prefers_cudnn_then_flash_on_hopper_and_flash_before_hopper():
    assert choose_attention("auto", H200).order == ("cudnn", "flash", "efficient", "math")
    assert choose_attention("auto", A100).order == ("flash", "efficient", "cudnn", "math")
    no_cudnn = dataclasses.replace(H200, cudnn=False)
    assert choose_attention("auto", no_cudnn).order == ("flash", "efficient", "math")


def test_auto_leaves_the_cpu_to_torch():
    choice = choose_attention("auto", CPU)
    assert choice.order is None and "default" in choice.line()


def test_a_named_backend_goes_first_and_math_stays_the_fallback():
    """Flash takes no mask: the block-masked calls must still find a kernel after it."""
    assert choose_attention("flash", H200).order == ("flash", "cudnn", "efficient", "math")
    assert choose_attention("efficient", A100).order == ("efficient", "flash", "cudnn", "math")
    assert choose_attention("math", H200).order == ("math",)
    assert choose_attention("flash", CPU).order == ("flash", "math")


@pytest.mark.parametrize(
    "name, caps", [("cudnn", CPU), ("efficient", CPU), ("cudnn", dataclasses.replace(A100, cudnn=False))]
)
def test_a_backend_the_device_lacks_is_refused_in_one_line(name, caps):
    with pytest.raises(ConfigError, match=f"--attention-backend {name}") as refused:
        choose_attention(name, caps)
    assert "\n" not in str(refused.value) and "use auto" in str(refused.value)


def test_flashattention3_is_noticed_not_used():
    """FA3's causal mask is per token; the KV-cached block-causal call needs a per-block one."""
    choice = choose_attention("auto", dataclasses.replace(H200, fa3=True))
    assert "flash_attn_interface" in choice.line() and "flash_attn_interface" not in (choice.order or ())


def test_the_choice_is_applied_around_the_forward():
    """Inside the chosen context SDPA may only use those kernels: math-only disables flash."""
    with choose_attention("math", CPU).context():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled(), "the context must restore the defaults"


def _latents(attention: str) -> torch.Tensor:
    preset = get_preset("tiny-wan")
    preset = dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, schedule="pyramid", offset=1))
    speed = SpeedConfig(attention=attention)
    session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32, speed=speed)
    assert attention in session.executors.speed_line
    with torch.no_grad():
        return torch.cat([block.latents for block in session.run("a red circle", blocks=4, seed=0)], dim=2)


def test_math_gives_the_default_output_on_cpu():
    """Masked, KV-cached pyramid forwards: the reference kernel against torch's CPU choice."""
    assert_close(_latents("math"), _latents("auto"), 1e-4, "math vs default SDPA latents")
