"""Wan2.2-TI2V-5B: the transformer and the 48-channel VAE against diffusers at tiny widths, each
released layout, the real presets' shapes, and the tiny variant through the runtime's parts.

pytest tests/models/test_wan22.py
"""

import dataclasses
import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from engine.config import SpeedConfig, VaeConfig, WanConfig
from engine.families import forward_flops
from engine.loading import build_kv_cache
from engine.models.attention import LocalView
from engine.models.checkpoints.wan import CheckpointError, load_weights, read_checkpoint
from engine.models.checkpoints.wan_vae import wan22_vae_key
from engine.models.rope import Rope
from engine.models.vae import StreamingDecoder, load_vae, random_vae
from engine.models.wan import WanModel
from engine.weight_paths import WeightPaths
from helpers import assert_close, diffusers_twin, tiny_model, write_diffusers_folder
from launch.benchmarks.gpu_report import analytic_limits
from launch.build import build_session
from launch.presets import TINY_WAN22_VAE, get_preset, parameter_count
from launch.throughput import DECODE_S, decode_seconds, sp_refusal

# TI2V-5B's layout (48 channels in and out, patch 1x2x2, 128-wide heads) at tiny widths
TINY22 = WanConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, in_channels=48, out_channels=48, text_dim=32,
                   freq_dim=32)  # fmt: skip
FRAMES, LATENT_H, LATENT_W = 3, 4, 6  # 704x1280 has 44x80: non-square here too


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(diffusers WanTransformer3DModel, ours read from the diffusers folder diffusers wrote)."""
    folder = write_diffusers_folder(tiny_model(seed=5, cfg=TINY22), tmp_path_factory.mktemp("ti2v") / "transformer")
    reference = type(diffusers_twin(TINY22)).from_pretrained(str(folder)).eval()
    with torch.device("meta"):
        ours = WanModel(TINY22)
    load_weights(ours, folder)
    return reference, ours.eval(), folder


def _flow(model: WanModel, latents, sigma, text):
    view = LocalView(Rope(TINY22, (LATENT_H // 2, LATENT_W // 2)), 0, FRAMES, FRAMES, "bidirectional")
    with torch.no_grad():
        return model(latents, sigma, model.embed_text(text), view)


def test_transformer_matches_diffusers_text_and_image_to_video(twins):
    """T2V: one timestep for all tokens. TI2V's image path (`expand_timesteps`): the first latent
    frame's tokens at t = 0 (the clean image), every other token at t, as diffusers' pipeline
    builds them from its first-frame mask; ours takes that as per-frame sigma."""
    reference, ours, _ = twins
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 48, FRAMES, LATENT_H, LATENT_W, generator=generator)
    text = torch.randn(1, 16, TINY22.text_dim, generator=generator)
    tokens = (LATENT_H // 2) * (LATENT_W // 2)
    for t in (1000.0, 937.5, 250.0):
        with torch.no_grad():
            expected = reference(latents, torch.tensor([t]), text).sample
        assert_close(_flow(ours, latents, torch.full((1, FRAMES), t / 1000), text), expected, 1e-5, f"t2v t={t}")
        mask = torch.ones(FRAMES, tokens)
        mask[0] = 0  # the image frame
        with torch.no_grad():
            expected = reference(latents, (mask.flatten() * t)[None], text).sample
        sigma = torch.tensor([[0.0] + [t / 1000] * (FRAMES - 1)])
        assert_close(_flow(ours, latents, sigma, text), expected, 1e-5, f"ti2v t={t}")


def test_transformer_loads_wan_native_and_longlive2_layouts(twins, tmp_path):
    """Wan2.2-TI2V-5B's own shards (native names) and LongLive-2.0's .pt files (generator /
    model / bare, keys `model.` + native names) give the same weights as the diffusers folder."""
    _, ours, _ = twins
    state = ours.state_dict()
    shard = {k: v.contiguous() for k, v in state.items()}
    save_file(shard, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    wrapped = {f"model.{k}": v.clone() for k, v in state.items()}
    for name, content in {"generator.pt": {"generator": wrapped}, "model.pt": {"model": wrapped},
                          "model_bf16.pt": wrapped}.items():  # fmt: skip
        torch.save(content, str(tmp_path / name))
    for path in ("diffusion_pytorch_model.safetensors", "generator.pt", "model.pt", "model_bf16.pt"):
        ckpt = read_checkpoint(tmp_path / path)
        assert set(ckpt.state) == set(state), path
        assert all(torch.equal(ckpt.state[k], v) for k, v in state.items()), path


# -- the VAE ---------------------------------------------------------------------------------------


_NATIVE_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}  # fmt: skip
_NATIVE_FIXED = {
    "quant_conv": "conv1", "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
    "encoder.norm_out": "encoder.head.0", "decoder.norm_out": "decoder.head.0",
    "encoder.conv_out": "encoder.head.2", "decoder.conv_out": "decoder.head.2",
    "encoder.mid_block.attentions.0": "encoder.middle.1", "decoder.mid_block.attentions.0": "decoder.middle.1",
}  # fmt: skip
_LEVEL = re.compile(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|\w+sampler)\.(.*)")


def _native22(key: str, num_res_blocks: int) -> str:
    """diffusers' AutoencoderKLWan key -> Wan2.2_VAE.pth's: a level's Resample is the entry after
    its residual blocks (num_res_blocks of them in the encoder, one more in the decoder)."""
    if m := _LEVEL.match(key):
        encoder = m[1].startswith("encoder")
        level = f"encoder.downsamples.{m[2]}.downsamples" if encoder else f"decoder.upsamples.{m[2]}.upsamples"
        if m[3] is None:
            return f"{level}.{num_res_blocks if encoder else num_res_blocks + 1}.{m[5]}"
        return f"{level}.{m[3]}.{_NATIVE_PARTS[m[4]]}.{m[5]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(.*)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_NATIVE_PARTS[m[3]]}.{m[4]}"
    for ours, native in _NATIVE_FIXED.items():
        if key.startswith(ours + "."):
            return native + key[len(ours) :]
    raise KeyError(key)


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_WAN22_VAE, seed=0)


def test_vae_streams_block_by_block_as_diffusers_decodes(vae):
    """Blocks of 1, 2, 2 latent frames through our streaming decoder equal diffusers' one-shot
    decode of the de-normalised latents (Wan2.2's 48 statistics): 16x spatial, 4x temporal."""
    assert isinstance(vae, AutoencoderKLWan) and vae.config.z_dim == 48 and vae.config.patch_size == 2
    latents = torch.randn(1, 48, 5, 2, 3, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(TINY_WAN22_VAE.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY_WAN22_VAE.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(latents * std + mean).sample
    decoder = StreamingDecoder(vae, TINY_WAN22_VAE)
    parts = [decoder.decode(latents[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 5))]
    assert [p.shape[2] for p in parts] == [1, 8, 8] and parts[0].shape[-2:] == (32, 48)
    assert TINY_WAN22_VAE.spatial_stride == 16 and TINY_WAN22_VAE.pixel_frames(5) == 17
    assert_close(torch.cat(parts, dim=2), expected, 1e-5, "streamed Wan2.2 decode")


def test_vae_loads_diffusers_folder_and_wan22_pth_and_refuses_a_wan21_vae(vae, tmp_path):
    cfg = dataclasses.replace(TINY_WAN22_VAE, num_res_blocks=2)  # the release's 2 blocks per level
    source = random_vae(cfg, seed=2)
    source.save_pretrained(str(tmp_path / "pipeline" / "vae"))
    native = {_native22(k, 2): v for k, v in source.state_dict().items()}
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in native  # resample after 3 blocks
    assert all(wan22_vae_key(k) == d for d, k in zip(source.state_dict(), native))
    torch.save(native, str(tmp_path / "Wan2.2_VAE.pth"))
    for path in (tmp_path / "pipeline", tmp_path / "Wan2.2_VAE.pth"):
        loaded = load_vae(cfg, path).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items()), path
    random_vae(VaeConfig(base_dim=4), seed=0).save_pretrained(str(tmp_path / "wan21" / "vae"))
    with pytest.raises(CheckpointError, match="16 latent channels and pixel patch 1; the preset needs 48 and 2"):
        load_vae(cfg, tmp_path / "wan21")


# -- the real presets, on the meta device -------------------------------------------------------


def test_real_presets_shapes_sizes_and_sp_degrees():
    longlive = get_preset("longlive2-5b")
    assert longlive.latent_hw == (44, 80) and longlive.tokens_per_frame == 880  # 704x1280 / 16, then 2x2
    assert longlive.stream.frames_per_block * longlive.tokens_per_frame == 7040
    assert longlive.pixel_frames(1) == 29 and longlive.pixel_frames(16) == 509  # 128 latent frames
    assert 4.9e9 < parameter_count(longlive) < 5.1e9  # "5B": 4,999,787,712
    kv = build_kv_cache(longlive, torch.bfloat16, "meta")
    assert kv.nbytes == 30 * 2 * 32 * 880 * 3072 * 2  # 30 layers, K and V, 32-frame window, bf16
    assert [n for n in range(1, 25) if sp_refusal(longlive, n) is None] == [1, 2, 3, 4, 6, 8, 12, 24]
    base = get_preset("wan2.2-ti2v-5b")
    assert base.pixel_frames(1) == 121 and base.model == longlive.model and base.vae == longlive.vae
    limit = analytic_limits(["longlive2-5b"])[0]  # the GPU report's row: 4 steps + the commit pass
    assert limit["block_tflop"] == pytest.approx(5 * forward_flops(longlive.model, 7040, 32 * 880, 512) / 1e12)
    assert 30 < limit["fps_at_700"] < 36, limit  # 32 frames per block
    assert decode_seconds(longlive) == pytest.approx(530.8e12 / (0.35 * 989e12))  # Wan2.2 VAE, 32 frames at 720p
    assert decode_seconds(get_preset("self-forcing-1.3b")) == pytest.approx(DECODE_S)


# -- the tiny variant through the runtime -------------------------------------------------------


def _video(preset, blocks: int = 3, **speed) -> torch.Tensor:
    session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32, speed=SpeedConfig(**speed))
    with torch.no_grad():
        return torch.cat([b.latents for b in session.run("a red circle moving left", blocks=blocks, seed=0)], dim=2)


def test_tiny_wan22_cascade_cache_and_fp8_kv():
    """tiny-wan22 (48 channels, UniPC, a sink): a cascade whose blocks never overlap (offset
    steps + 1, lagged context) equals sequential generation; feature caching at threshold 0 equals
    no caching; fp8 K/V storage stays close."""
    preset = get_preset("tiny-wan22")
    plan = lambda **kw: dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, **kw))  # noqa: E731
    sequential = _video(preset)
    cascade = _video(plan(schedule="cascade", offset=preset.sampling.steps + 1, context="lagged"))
    assert_close(cascade, sequential, 1e-6, "cascade, offset steps+1, vs sequential")
    cache = dataclasses.replace(preset.cache, policy="fbcache", threshold=0.0)
    assert torch.equal(_video(dataclasses.replace(preset, cache=cache)), sequential)
    fp8 = _video(preset, kv_cache="fp8")
    relative = ((fp8 - sequential).pow(2).mean() / sequential.pow(2).mean()).sqrt()
    assert 0 < relative < 2**-4, f"fp8 K/V: relative RMS {relative:.3e}"
