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
