"""MAGI-1's transformer VAE: tile shapes, tiled and chunk-by-chunk decode, prefix encoding, the
released weights layout and the files it refuses; parity with SandAI-org/MAGI-1's own code where
that code can be imported (MAGI1_REFERENCE=path/to/MAGI-1 and its imports installed).

pytest tests/models/test_magi_vae.py
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import ConfigError
from engine.families import family_of
from engine.models.checkpoints.magi_vae import load_magi_vae
from engine.models.checkpoints.validate import CheckpointError
from engine.models.magi_vae import random_magi_vae
from engine.models.magi_vae_tiles import (
    MagiStreamingDecoder,
    encode_frames,
    encode_prefix,
    stretch_frames,
    tiled_decode,
    tiled_encode,
)
from engine.models.vae import random_vae
from helpers import assert_close
from launch.presets import TINY_VAE, get_preset

TINY = get_preset("magi-1-tiny")
CFG = TINY.vae.magi  # 1 layer, 256 wide, 32-pixel tiles (4 latents, a blended quarter), 8-frame tiles
DDCONFIG = {"video_size": 32, "video_length": 8, "patch_size": 8, "patch_length": 4, "z_chans": 4, "embed_dim": 256,
            "depth": 1, "num_heads": 4, "qkv_bias": True, "ln_in_attn": True, "conv_last_layer": True}  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    return random_magi_vae(CFG, seed=0)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tiles_chunks_and_prefix_shapes(vae):
    """Tile and tiled shapes (sizes that are no multiple of a tile); a stream decoded chunk by chunk
    equals one tiled decode when chunks are whole temporal tiles; one tile is tiled as itself;
    encode_start makes whole chunks of the clip's first frames, an image held still."""
    with torch.no_grad():
        assert vae.encode(_randn(1, 3, 8, 32, 32)).shape == (1, 4, 2, 4, 4)
        assert vae.encode(_randn(1, 3, 1, 16, 24)).shape == (1, 4, 1, 2, 3), "an image: one latent frame"
        assert vae.decode(_randn(1, 4, 1, 4, 4)).shape == (1, 3, 1, 32, 32), "one latent frame: one frame"
        assert tiled_encode(vae, _randn(1, 3, 20, 56, 64)).shape == (1, 4, 5, 7, 8)
        z = _randn(1, 4, 6, 7, 9)
        whole = tiled_decode(vae, z)
        assert whole.shape == (1, 3, 24, 56, 72)
        one_tile = z[:, :, :2, :3, :3]  # within one step (3 latents): a single tile
        assert torch.equal(tiled_decode(vae, one_tile), vae.decode(one_tile))
    decoder = MagiStreamingDecoder(vae)
    chunks = [decoder.decode(z[:, :, i : i + 2] * CFG.scale_factor) for i in (0, 2, 4)]
    assert_close(torch.cat(chunks, dim=2), whole.clamp(-1, 1), 1e-6, "chunk-by-chunk vs whole tiled decode")
    with pytest.raises(ConfigError, match="whole 2-frame temporal tiles"):  # chunks that split a tile
        dataclasses.replace(TINY, stream=dataclasses.replace(TINY.stream, frames_per_block=3, window_frames=6))
    frames = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    assert encode_prefix(vae, frames).shape == (1, 4, 8, 8, 8), "MAGI-1 encodes the first 32 frames"
    family = family_of(TINY.model)
    start = family.encode_start(TINY, decoder, frames, latent_frames=4)
    assert torch.equal(start, encode_prefix(vae, frames)[:, :, :4]), "whole chunks of the first 32 frames"
    image = family.encode_start(TINY, decoder, frames[:1, :48], latent_frames=4)  # stretched to 64x64
    still = np.repeat(stretch_frames(frames[:1, :48], 64, 64), 8, axis=0)  # one chunk: 8 frames
    assert image.shape == (1, 4, 2, 8, 8) and torch.equal(image, encode_frames(vae, still))


def _write_release(vae, folder, state=None, ddconfig=DDCONFIG):
    """sand-ai/MAGI-1's layout: ckpt/vae/{config.json, diffusion_pytorch_model.safetensors}."""
    release = folder / "ckpt" / "vae"
    release.mkdir(parents=True)
    (release / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": ddconfig}))
    save_file(state if state is not None else vae.state_dict(), str(release / "diffusion_pytorch_model.safetensors"))
    return release


def test_released_layout_loads_and_wrong_files_are_refused(vae, tmp_path):
    _write_release(vae, tmp_path / "good")
    loaded = load_magi_vae(CFG, tmp_path / "good")  # the folder above ckpt/, as --base gives it
    z = _randn(1, 4, 2, 8, 8)
    assert torch.equal(tiled_decode(loaded, z), tiled_decode(vae, z))
    state = vae.state_dict()
    torch.save(state, tmp_path / "vae.pth")
    assert torch.equal(load_magi_vae(CFG, tmp_path / "vae.pth").decoder.proj_in.weight, vae.decoder.proj_in.weight)
    wrong = {
        "missing": ({k: v for k, v in state.items() if k != "decoder.last_layer.bias"}, DDCONFIG),
        "shape": ({**state, "encoder.pos_embed": torch.zeros(1, 9, 256)}, DDCONFIG),
        "wan": (random_vae(TINY_VAE, 0).state_dict(), DDCONFIG),
        "heads": (state, {**DDCONFIG, "num_heads": 8}),
        "nan": ({**state, "decoder.proj_in.bias": torch.full((256,), float("nan"))}, DDCONFIG),
    }
    said = {"missing": "missing decoder.last_layer.bias", "shape": "encoder.pos_embed has shape (1, 9, 256)",
            "wan": "this is a Wan VAE", "heads": "num_heads is 8", "nan": "NaN"}  # fmt: skip
    for name, (bad, ddconfig) in wrong.items():
        _write_release(vae, tmp_path / name, bad, ddconfig)
        with pytest.raises(CheckpointError, match=re.escape(said[name])) as err:
            load_magi_vae(CFG, tmp_path / name)
        assert "\n" not in str(err.value), str(err.value)
    with pytest.raises(CheckpointError, match="no MAGI-1 VAE here"):
        load_magi_vae(CFG, tmp_path)


# -- parity with MAGI-1's own code (where it imports) -------------------------------------------


@pytest.fixture
def reference(monkeypatch):
    """SandAI-org/MAGI-1's ViTVAE, run at float32 on this device: its attention (flash-attn, bf16
    inputs) is swapped for exact float32 attention and its bf16 cast undone for this test only."""
    root = os.environ.get("MAGI1_REFERENCE")
    if not root:
        pytest.skip("MAGI1_REFERENCE (a SandAI-org/MAGI-1 checkout) not set")
    monkeypatch.syspath_prepend(root)
    module = pytest.importorskip("inference.model.vae.vae_module")
    model = pytest.importorskip("inference.model.vae.vae_model")

    def float32_attention(qkv, dropout_p=0.0, **_):
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    monkeypatch.setattr(module, "flash_attn_qkvpacked_func", float32_attention)
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self)
    if not torch.distributed.is_initialized():  # its tile loop names the rank in a progress bar
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    return model, module


def test_parity_with_magi1_vae(reference):
    model, module = reference
    ref = model.ViTVAE(ddconfig={**DDCONFIG, "double_z": True, "mlp_ratio": 4.0, "with_cls_token": True}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = random_magi_vae(CFG, seed=0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.encode = lambda x: module.DiagonalGaussianDistribution(ref.encoder(x)).mode()  # the pipeline's encode
    # tiled as the pipeline calls it (its VaeHelper asks for spatial tiles, which ViTVAE turns off by default)
    tiles = {"tile_sample_min_height": 32, "tile_sample_min_width": 32, "tile_sample_min_length": 8,
             "spatial_tile_overlap_factor": 0.25, "temporal_tile_overlap_factor": 0,
             "allow_spatial_tiling": True}  # fmt: skip
    x, z = _randn(1, 3, 16, 64, 80) * 0.5, _randn(1, 4, 4, 7, 9)
    with torch.no_grad():
        assert_close(tiled_encode(ours, x), ref.tiled_encode_3d(x, **tiles), 1e-5, "tiled encode vs MAGI-1")
        assert_close(tiled_decode(ours, z), ref.tiled_decode_3d(z, **tiles), 1e-5, "tiled decode vs MAGI-1")
