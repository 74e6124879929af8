"""Our Wan model, loaded from a diffusers folder, equals diffusers' WanTransformer3DModel.

pytest tests/models/test_parity_diffusers.py
"""

import pytest
import torch

from engine.models.attention import LocalView
from engine.models.checkpoints.wan import load_weights
from engine.models.rope import Rope
from engine.models.wan import WanModel
from helpers import TINY, assert_close, diffusers_twin, tiny_model, write_diffusers_folder

FRAMES, LATENT_H, LATENT_W = 3, 8, 12  # one 3-frame block; a non-square grid catches h/w mix-ups


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(diffusers model, our model) holding the same random weights, ours read through our loader."""
    folder = write_diffusers_folder(tiny_model(seed=3), tmp_path_factory.mktemp("wan") / "transformer", "40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture should exercise sharded loading"
    reference = diffusers_twin(TINY)
    reference.load_state_dict(type(reference).from_pretrained(str(folder)).state_dict())
    with torch.device("meta"):
        ours = WanModel(TINY)
    load_weights(ours, folder)
    return reference, ours.eval()


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, TINY.in_channels, FRAMES, LATENT_H, LATENT_W, generator=generator)
    text = torch.randn(1, 16, TINY.text_dim, generator=generator)
    return latents, text


def _ours(model: WanModel, latents, sigma, text):
    view = LocalView(Rope(TINY, (LATENT_H // 2, LATENT_W // 2)), 0, FRAMES, FRAMES, "bidirectional")
    with torch.no_grad():
        return model(latents, sigma, model.embed_text(text), view)


@pytest.mark.parametrize("timestep", [0.0, 250.0, 937.5, 1000.0])
def test_one_block_matches_diffusers(twins, timestep):
    reference, ours = twins
    latents, text = _inputs(seed=int(timestep))
    with torch.no_grad():
        expected = reference(latents, torch.tensor([timestep]), text).sample
    actual = _ours(ours, latents, torch.full((1, FRAMES), timestep / 1000.0), text)
    assert_close(actual, expected, 1e-5, f"flow at t={timestep}")


def test_per_frame_timesteps_match_diffusers_per_token(twins):
    """Per-frame sigma equals diffusers' per-token timestep (Wan2.2 path) expanded over each frame."""
    reference, ours = twins
    latents, text = _inputs(seed=7)
    t = torch.tensor([[1000.0, 625.0, 0.0]])
    tokens_per_frame = (LATENT_H // 2) * (LATENT_W // 2)
    with torch.no_grad():
        expected = reference(latents, t.repeat_interleave(tokens_per_frame, dim=1), text).sample
    actual = _ours(ours, latents, t / 1000.0, text)
    assert_close(actual, expected, 1e-5, "flow with per-frame timesteps")
