"""Build the parts of a pipeline from a preset: weights (or seeded random ones), KV caches.

Each builder raises `SetupError` with the flag to pass when something it needs is missing, before
anything heavy is loaded where possible. Every part loaded from files goes through the same value
check as the transformer's checkpoint (floating-point dtypes, finite values: `CheckpointError`).
Whether the parts fit the device is the memory plan's question, asked before any of them is built
(launch/memory.py, counting these builders' parts on the meta device).
What differs between model families (network, seeded weights, checkpoint layouts, rotary tables)
is asked of the preset's family (engine/families/); the paths come from engine/weight_paths.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.config import ModelConfig, Preset, TinyTextEncoder
from engine.demo.pixels import CODEC_KEYS, PatchCodec, PatchDecoder
from engine.demo.vocab import VocabEncoder
from engine.devices import SetupError
from engine.families import family_of
from engine.models.checkpoints.lora import LoraMerge, merge_lora
from engine.models.checkpoints.magi_vae import load_magi_vae
from engine.models.checkpoints.validate import check_file_dtypes, check_tensors
from engine.models.magi import MagiModel
from engine.models.magi_rope import MagiRope
from engine.models.magi_tokens import SpecialTokens
from engine.models.magi_vae import MagiVae, random_magi_vae
from engine.models.magi_vae_tiles import MagiStreamingDecoder
from engine.models.random_init import SMALL_MODEL_PARAMS
from engine.models.rope import Rope
from engine.models.text_encoder import PromptEncoder, TextEncoder
from engine.models.vae import StreamingDecoder, load_vae, place_vae, random_vae
from engine.models.vae_encoder import StreamingEncoder
from engine.models.wan import WanModel
from engine.runtime.kv import KVCache
from engine.weight_paths import WeightPaths, check_paths

log = logging.getLogger(__name__)


def new_model(cfg: ModelConfig) -> WanModel | MagiModel:
    """The network of a model family (on the current default device; meta for counting)."""
    return family_of(cfg).new_model(cfg)


def missing_weights(preset: Preset, weights: WeightPaths) -> str | None:
    """The builders' own refusal for a part the weights do not give (None: every part is there),
    asked before anything is built or sized: a missing file is said before the memory it would take."""
    check_paths(weights)
    if weights.random:
        return None
    if weights.resolved("transformer", preset) is None and not preset.random_init:
        return _no_transformer(preset)
    if preset.text.vocab is None and preset.text.tiny is None and weights.resolved("text_encoder") is None:
        return _no_text_encoder(preset)
    if preset.vae.kind == "wan" and weights.resolved("vae") is None and not preset.random_init:
        return _no_vae(preset)
    return None


def _no_transformer(preset: Preset) -> str:
    return f"preset {preset.name} needs transformer weights: pass --checkpoint PATH (or --base DIR)"


def _no_text_encoder(preset: Preset) -> str:
    return (f"preset {preset.name} needs a umT5 text encoder: pass --text-encoder DIR "
            "(a transformers folder, e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder) or --base DIR")  # fmt: skip


def _no_vae(preset: Preset) -> str:
    return f"preset {preset.name} needs VAE weights: pass --vae PATH (folder or Wan2.1_VAE.pth) or --base DIR"


def build_model(preset: Preset, weights: WeightPaths, device: torch.device, dtype: torch.dtype) -> WanModel | MagiModel:
    check_paths(weights)
    with torch.device("meta"):
        model = new_model(preset.model)
    checkpoint = weights.resolved("transformer", preset)
    load = checkpoint is not None and not weights.random
    if not load and not (preset.random_init or weights.random):
        raise SetupError(_no_transformer(preset))
    params = sum(p.numel() for p in model.parameters())
    if load:
        _load_streamed(model, preset, weights, Path(checkpoint), device, dtype)
    else:
        model.to_empty(device="cpu" if params < SMALL_MODEL_PARAMS else device)
        family_of(preset.model).init_random_(model, weights.seed)
        if weights.lora is not None:
            merged = merge_lora(model, weights.lora, alpha=weights.lora_alpha)
            log.info("merged %d LoRA adapters from %s", merged, weights.lora)
    return model.to(device).cast(dtype).eval()


def _load_streamed(
    model: WanModel | MagiModel, preset: Preset, weights: WeightPaths, path: Path, device: torch.device, dtype
) -> None:
    """The checkpoint into the meta `model`, tensor by tensor, straight to `device` in the dtypes
    `model.cast(dtype)` gives; a LoRA is merged into each weight as it loads (float32, before the
    cast). Host memory beyond the model: about one tensor (engine/models/checkpoints/streaming.py)."""
    start = time.perf_counter()
    model.cast(dtype)  # on the meta device: only sets the dtype each parameter is loaded in
    lora = LoraMerge(model, weights.lora, alpha=weights.lora_alpha) if weights.lora is not None else None
    ckpt = family_of(preset.model).load_checkpoint(model, preset, weights, path, device=device, edit=lora)
    log.info("transformer: %s, loaded in %.1f s", ckpt.describe(), time.perf_counter() - start)
    if lora is not None:
        log.info("merged %d LoRA adapters from %s", lora.merged, weights.lora)


def build_text_encoder(preset: Preset, weights: WeightPaths, device: torch.device, dtype: torch.dtype) -> PromptEncoder:
    check_paths(weights)
    _warn_unused_tokenizer(preset, weights)
    if preset.text.vocab is not None:
        encoder = _vocab_encoder(preset, weights, device)
    else:
        encoder = _umt5_encoder(preset, weights, device, dtype)
    if encoder.width != preset.model.text_dim:
        raise SetupError(f"text encoder width {encoder.width} != model text_dim {preset.model.text_dim}")
    return encoder


def build_special_tokens(preset: Preset, weights: WeightPaths) -> SpecialTokens | None:
    """The caption tokens a MAGI-1 preset prepends (None for presets without any)."""
    if not preset.text.special_tokens:
        return None
    if weights.random or preset.random_init:
        return SpecialTokens.random(preset.model.text_dim, weights.seed)
    if weights.special_tokens is None:
        raise SetupError(
            f"{preset.name}: MAGI-1's run scripts prepend special caption tokens: pass --special-tokens "
            "special_tokens.npz (example/assets/ in the MAGI-1 repository)"
        )
    try:
        tokens = SpecialTokens.load(Path(weights.special_tokens))
    except (OSError, ValueError) as err:
        raise SetupError(f"--special-tokens: {err}") from err
    if tokens.width != preset.model.text_dim:
        raise SetupError(
            f"--special-tokens {weights.special_tokens}: width {tokens.width}, text_dim is {preset.model.text_dim}"
        )
    return tokens


def _warn_unused_tokenizer(preset: Preset, weights: WeightPaths) -> None:
    """--tokenizer only goes with a umT5 folder; anywhere else it would be ignored without a word."""
    if weights.tokenizer is None:
        return
    if preset.text.vocab is not None:
        why = f"preset {preset.name} encodes prompts with its own word vocabulary"
    elif weights.random:
        why = "random weights use a byte-level tokenizer"
    elif weights.resolved("text_encoder") is None:
        why = "it goes with a umT5 text encoder folder (--text-encoder or --base)"
    else:
        return
    log.warning("--tokenizer %s is not used: %s", weights.tokenizer, why)


def _vocab_encoder(preset: Preset, weights: WeightPaths, device: torch.device) -> VocabEncoder:
    vocab, text_len = preset.text.vocab, preset.text.text_len
    path = weights.resolved("text_encoder", preset)
    if path is not None and not weights.random:
        check_file_dtypes(path)  # before the load, which would cast int8 to float
        encoder = VocabEncoder.load(path, vocab, text_len, device)
        check_tensors(encoder.module.state_dict(), path)
        return encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed)
        return VocabEncoder.create(vocab, text_len, preset.model.text_dim, device)


def _umt5_encoder(preset: Preset, weights: WeightPaths, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    folder = weights.resolved("text_encoder")
    if folder is not None and not weights.random:
        encoder = TextEncoder.from_folder(  # checks the values itself
            folder, text_len=preset.text.text_len, device=device, dtype=dtype, tokenizer_dir=weights.tokenizer
        )
    elif preset.text.tiny is not None or weights.random:
        spec = preset.text.tiny or TinyTextEncoder(d_model=preset.model.text_dim, num_layers=1, seed=weights.seed)
        encoder = TextEncoder.random(spec, text_len=preset.text.text_len, device=device)
    else:
        raise SetupError(_no_text_encoder(preset))
    return encoder


def build_decoder(
    preset: Preset, weights: WeightPaths, device: torch.device, dtype: torch.dtype = torch.float32
) -> StreamingDecoder | PatchDecoder | MagiStreamingDecoder:
    """The preset's decoder on `device`, its weights and decode at `dtype` (--vae-dtype; the demo's
    patch codec, a few kilobytes, stays float32: halving it would free nothing worth a rounding)."""
    if preset.vae.kind == "patches":
        return PatchDecoder(build_patch_codec(preset, weights))
    if preset.vae.kind == "magi":
        return MagiStreamingDecoder(build_magi_vae(preset, weights).to(device, dtype))
    path = weights.resolved("vae")
    if path is not None and not weights.random:
        source = path / "vae" if (path / "vae").is_dir() else path  # a pipeline root holds vae/
        check_file_dtypes(source)  # before the load, which would cast int8 to float
        vae = load_vae(preset.vae, path)
        check_tensors(vae.state_dict(), source)
    elif preset.random_init or weights.random:
        vae = random_vae(preset.vae, weights.seed)
    else:
        raise SetupError(_no_vae(preset))
    return StreamingDecoder(place_vae(vae, device, dtype), preset.vae)


def build_magi_vae(preset: Preset, weights: WeightPaths) -> MagiVae:
    """MAGI-1's transformer VAE: from --vae (or the --base folder holding ckpt/vae), else seeded."""
    path = weights.resolved("vae")
    if path is not None and not weights.random:
        return load_magi_vae(preset.vae.magi, path)
    if preset.random_init or weights.random:
        return random_magi_vae(preset.vae.magi, weights.seed)
    raise SetupError(
        f"preset {preset.name} needs MAGI-1's VAE: pass --vae DIR (ckpt/vae of sand-ai/MAGI-1, "
        "holding diffusion_pytorch_model.safetensors) or --base DIR (the folder holding ckpt/)"
    )


def encoders_for(preset: Preset, decoder, device: torch.device):
    """A maker of one stream's video-in encoder (frames -> normalised latents) from the loaded
    decoder's weights: the demo's codec, or the Wan VAE's encoder; None for a family without one."""
    if isinstance(decoder, PatchDecoder):
        codec = decoder.codec
        return lambda: lambda frames: codec.encode(frames, device)
    if isinstance(decoder, StreamingDecoder):
        return lambda: StreamingEncoder(decoder.vae, preset.vae)
    return None


def build_patch_codec(preset: Preset, weights: WeightPaths) -> PatchCodec:
    path = weights.resolved("vae", preset)
    if weights.random or path is None:
        return PatchCodec.random(preset.vae.patch, preset.vae.z_dim, weights.seed)
    check_file_dtypes(path)
    codec = PatchCodec.load(path, preset.vae.patch)
    check_tensors({key: getattr(codec, key) for key in CODEC_KEYS}, path)
    return codec


def build_rope(preset: Preset, device, model: WanModel | MagiModel | None = None) -> Rope | MagiRope:
    """The rotary tables of the preset's family (MAGI-1's from the model's learned bands; without a
    model, e.g. to size a cache, from their initial values)."""
    return family_of(preset.model).rope(preset, latent_grid(preset), device, model)


def latent_grid(preset: Preset) -> tuple[int, int]:
    """Tokens along (height, width) of one latent frame after patching."""
    h, w = preset.latent_hw
    return h // preset.model.patch_size[1], w // preset.model.patch_size[2]


def build_kv_cache(
    preset: Preset,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    batch: int = 1,
    scratch_frames: int | None = None,
    ring_frames: int | None = None,
    rope: Rope | MagiRope | None = None,
    head_shards: int = 1,
    storage: str = "model",
) -> KVCache:
    """The KV cache of one stream of `preset` (on the meta device to measure it without memory);
    `storage`: committed K/V in the model dtype or fp8 (engine/runtime/fp8.py)."""
    cfg, stream = preset.model, preset.stream
    return KVCache(
        rope=rope or build_rope(preset, device),
        layers=cfg.num_layers,
        batch=batch,
        heads=cfg.kv_heads // head_shards,  # sequence parallelism: each rank keeps its group of heads
        head_dim=cfg.head_dim,
        sink_frames=stream.sink_frames,
        rebase_sink=stream.sink_mode == "rebased",
        ring_frames=stream.ring_frames if ring_frames is None else ring_frames,
        scratch_frames=scratch_frames or stream.frames_per_block,
        dtype=dtype,
        device=device,
        storage=storage,
    )
