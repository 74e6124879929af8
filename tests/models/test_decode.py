"""Streaming VAE decode equals one-shot decode; VAE weights load from both released layouts.

pytest tests/models/test_decode.py
"""

import pytest
import torch
from diffusers import AutoencoderKLWan

from engine.config import VaeConfig
from engine.models.checkpoints.wan import CheckpointError
from engine.models.vae import StreamingDecoder, load_vae, random_vae
from helpers import assert_close, vae_key_to_native

TINY_VAE = VaeConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
MEAN, STD = (0.1, -0.2, 0.3, 0.0), (0.5, 1.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_VAE, seed=0)


@pytest.mark.parametrize("splits", [(3, 3, 3), (1, 4, 2, 2)])
def test_block_by_block_equals_one_shot(vae, splits):
    cfg = VaeConfig(**{**TINY_VAE.__dict__, "latents_mean": MEAN, "latents_std": STD})
    latents = torch.randn(1, 4, sum(splits), 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(latents * std + mean).sample
    decoder = StreamingDecoder(vae, cfg)
    parts, start = [], 0
    for size in splits:
        parts.append(decoder.decode(latents[:, :, start : start + size]))
        start += size
    assert [p.shape[2] for p in parts] == [TINY_VAE.pixel_frames(splits[0])] + [4 * s for s in splits[1:]]
    assert_close(torch.cat(parts, dim=2), expected, 1e-4, f"streamed decode {splits}")


def test_reset_starts_a_new_video(vae):
    cfg = VaeConfig(**{**TINY_VAE.__dict__, "latents_mean": MEAN, "latents_std": STD})
    decoder = StreamingDecoder(vae, cfg)
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    first = decoder.decode(latents)
    decoder.decode(latents)
    decoder.reset()
    assert torch.equal(decoder.decode(latents), first)


def test_latent_statistics_must_match_channels(vae):
    with pytest.raises(ValueError, match="4 channels"):
        StreamingDecoder(vae, TINY_VAE)  # tiny VAE + Wan's 16-channel statistics from its config


def test_loads_diffusers_folder_and_wan_native_pth(tmp_path):
    """A diffusers vae/ folder and Wan's own Wan2.1_VAE.pth layout load to the same decoder."""
    cfg = VaeConfig(base_dim=4)  # the released architecture (2 res blocks per level), narrow
    source = random_vae(cfg, seed=3)
    source.save_pretrained(str(tmp_path / "pipeline" / "vae"))
    native = {vae_key_to_native(k): v for k, v in source.state_dict().items()}
    torch.save(native, str(tmp_path / "Wan2.1_VAE.pth"))
    wan_repo = tmp_path / "Wan2.1-T2V-1.3B"  # Wan's own repo: WanModel config.json beside the VAE .pth
    wan_repo.mkdir()
    (wan_repo / "config.json").write_text('{"_class_name": "WanModel", "dim": 1536}')
    torch.save(native, str(wan_repo / "Wan2.1_VAE.pth"))
    for path in (tmp_path / "pipeline", tmp_path / "Wan2.1_VAE.pth", wan_repo):
        loaded = load_vae(cfg, path)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), f"{path.name}: {key}"


def test_bad_vae_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no VAE found"):
        load_vae(TINY_VAE, tmp_path / "empty")
    torch.save({"decoder.upsamples.0.residual.0.gamma": torch.zeros(1)}, str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointError, match="partial.pth: VAE weights do not fit"):
        load_vae(TINY_VAE, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="no such VAE"):
        load_vae(TINY_VAE, tmp_path / "missing.pth")
    assert isinstance(random_vae(TINY_VAE, 0), AutoencoderKLWan)


def test_a_bfloat16_vae_decodes_within_its_rounding():
    """--vae-dtype bfloat16 on tiny-wan: weights, causal cache and decode in bf16 (8-bit mantissa,
    a relative rounding of 2^-9 per op), frames back in float32. Two latent frames decoded one call
    each (the second reads the cache the first left: 1 + 4 frames) stay within 0.05 of the float32
    decoder's frames (6 of 255 levels) and 0.01 on average. The video-in encoder shares the weights.
    bf16 convolutions are slow on a CPU without bf16 units: one frame per call keeps this short."""
    from engine.loading import build_decoder, encoders_for
    from engine.weight_paths import WeightPaths
    from launch.presets import get_preset

    preset, cpu = get_preset("tiny-wan"), torch.device("cpu")
    latents = torch.randn(preset.latent_shape(2), generator=torch.Generator().manual_seed(0))
    frames = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = build_decoder(preset, WeightPaths(), cpu, dtype)
        assert {p.dtype for p in decoder.vae.parameters()} == {dtype}
        frames[dtype] = torch.cat([decoder.decode(latents[:, :, i : i + 1]) for i in range(2)], dim=2)
    assert frames[torch.bfloat16].dtype == torch.float32 and frames[torch.bfloat16].shape[2] == 5
    diff = (frames[torch.bfloat16] - frames[torch.float32]).abs()
    assert diff.max() <= 0.05 and diff.mean() <= 0.01, f"max {diff.max():.4g}, mean {diff.mean():.4g}"
    print(f"bf16 vs float32 decode: max {diff.max():.4g}, mean {diff.mean():.4g}")
    pixels = ((frames[torch.bfloat16][0, :, :1] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert encoders_for(preset, decoder, cpu)()(pixels).dtype == torch.float32  # the first frame alone
