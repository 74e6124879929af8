"""The typed, validated configuration tree.

Every component takes only its own slice: the transformer takes a `WanConfig`, the decoder a
`VaeConfig`, the KV cache derives its shape from `WanConfig` + `StreamConfig`, and so on. All
sizes (tokens per frame, KV capacity, RoPE splits) are derived here from these fields, never
hard-coded elsewhere. Presets (`launch/presets.py`) are named functions returning a `Preset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


class ConfigError(ValueError):
    """A configuration that cannot describe a runnable model or stream."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Wan2.1 DiT dimensions (the parameter layout every Wan-based causal checkpoint shares, and
    Wan2.2-TI2V-5B's)."""

    family: ClassVar[str] = "wan"
    """The model family (engine/families/): how its network is built, loaded, conditioned and counted."""
    special_tokens: ClassVar[bool] = False
    """Whether prompts may carry special caption tokens (MAGI-1's)."""
    dim: int
    """Hidden size (1536 for 1.3B, 5120 for 14B)."""
    ffn_dim: int
    """Feed-forward inner size."""
    num_heads: int
    """Attention heads; head_dim = dim / num_heads (128 in the released models)."""
    num_layers: int
    """Transformer blocks."""
    in_channels: int = 16
    """Latent channels in (the VAE's z_dim)."""
    out_channels: int = 16
    """Latent channels out (the flow prediction)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch; t must be 1 so that modulation can be per latent frame."""
    text_dim: int = 4096
    """Width of the text encoder's hidden states (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before cross-attention (all released T2V models)."""
    fps_embedding: bool = False
    """SkyReels-V2 DF 1.3B: a learned 16-fps / other-fps embedding added to the modulation."""

    def __post_init__(self) -> None:
        _require(min(self.dim, self.ffn_dim, self.num_heads, self.num_layers) > 0, "model sizes must be positive")
        _require(self.dim % self.num_heads == 0, f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        _require(self.head_dim % 2 == 0 and self.head_dim >= 6, f"head_dim {self.head_dim} must be even and >= 6")
        _require(self.patch_size[0] == 1, "temporal patch size must be 1 (per-frame modulation)")
        _require(self.freq_dim % 2 == 0, "freq_dim must be even")

    def check_preset(self, preset: Preset) -> None:
        """What a preset of this family must hold (called by `Preset`): Wan models run every plan."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Heads of the self-attention keys/values (what the KV cache stores)."""
        return self.num_heads

    @property
    def rope_pairs(self) -> tuple[int, int, int]:
        """Rotary pairs given to the (time, height, width) axes: head_dim/2 split as Wan does."""
        half = self.head_dim // 2
        spatial = half // 3
        return half - 2 * spatial, spatial, spatial


@dataclass(frozen=True, kw_only=True)
class MagiConfig:
    """MAGI-1 DiT dimensions (`VideoDiTModel`; reference/skyreels-v2-and-magi-1.md §2.1, §2.6)."""

    family: ClassVar[str] = "magi"
    special_tokens: ClassVar[bool] = True
    dim: int
    """hidden_size: 3072 (4.5B), 6144 (24B)."""
    ffn_dim: int
    """ffn_hidden_size: 12288 (4.5B), 16384 (24B); SwiGLU's fc1 is twice as wide."""
    num_heads: int
    """Query heads (24 / 48), 128 channels each."""
    num_layers: int
    kv_heads: int = 8
    """num_query_groups: GQA key/value heads."""
    in_channels: int = 16
    """Latent channels of the VAE (the network's input is twice as wide with half_channel_vae)."""
    out_channels: int = 16
    half_channel_vae: bool = False
    """24B: the latent is duplicated to 2 * in_channels on the way in, and the first half of the
    output is kept."""
    x_rescale_factor: float = 1.0
    """24B: 0.1. Input latents are multiplied by it, the output divided by it."""
    gated_linear_unit: bool = False
    """SwiGLU MLP (24B) instead of GELU (4.5B)."""
    cond_hidden_ratio: float = 0.25
    """Width of the condition vector (time + caption token) relative to dim."""
    text_dim: int = 4096
    """caption_channels: T5-XXL states."""
    caption_len: int = 800
    """caption_max_length: rows of the learned null caption."""
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_bands: int = 16
    """Learnable frequencies per axis: sin and cos over (T, H, W) rotate 2 * 3 * 16 = 96 of each
    head's 128 channels."""
    distill: bool = False
    """Distilled (shortcut) models add a step-size embedding to the time embedding."""
    fps_embedding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _require(min(self.dim, self.ffn_dim, self.num_heads, self.num_layers, self.kv_heads) > 0, "sizes must be > 0")
        _require(self.dim % self.num_heads == 0, f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        _require(self.num_heads % self.kv_heads == 0, f"{self.num_heads} heads do not share {self.kv_heads} kv heads")
        _require(self.rotary_dim <= self.head_dim, f"{self.rotary_dim} rotary channels exceed head_dim {self.head_dim}")
        _require(self.patch_size[0] == 1, "temporal patch size must be 1 (per-chunk modulation)")
        _require(self.x_rescale_factor > 0, "x_rescale_factor must be positive")

    def check_preset(self, preset: Preset) -> None:
        """What a preset of this family must hold (called by `Preset`)."""
        plan, sampling = preset.plan, preset.sampling
        _require(sampling.magi is not None, f"{preset.name}: MAGI-1 models need sampling.magi (their guidance)")
        _require(plan.schedule != "skyreels", "MAGI-1 runs sequential, pyramid and cascade plans")
        _require(plan.attention == "causal", "MAGI-1 chunks attend causally (the model was trained so)")
        _require(preset.stream.sink_frames == 0, "MAGI-1 keeps no sink frames (its KV ranges count recent chunks)")
        _require(
            preset.cache.policy in ("none", "flowcache"),
            "MAGI-1 caches with flowcache: the other policies read signals of Wan's layers",
        )
        if plan.history_reach is not None:
            _require(sampling.steps % len(plan.history_reach) == 0, "steps must split into the history_reach stages")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def cond_dim(self) -> int:
        return int(self.dim * self.cond_hidden_ratio)

    @property
    def rotary_dim(self) -> int:
        return 6 * self.rope_bands

    @property
    def network_in_channels(self) -> int:
        return 2 * self.in_channels if self.half_channel_vae else self.in_channels


ModelConfig = WanConfig | MagiConfig


VAE_KINDS = ("wan", "patches", "magi")


@dataclass(frozen=True, kw_only=True)
class MagiVaeConfig:
    """MAGI-1's transformer VAE (`ViTVAE`, released as `ckpt/vae`): a ViT encoder and decoder over
    4 x 8 x 8 patches, 24 layers each, 1024 wide, 16 heads, 16 latent channels."""

    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    z_dim: int = 16
    patch_size: int = 8
    patch_length: int = 4
    """Spatial and temporal patch: the compression (8x, 4x)."""
    trained_size: int = 256
    trained_frames: int = 16
    """The pixel clip its learned position tables are laid out for; other tiles interpolate them."""
    scale_factor: float = 0.18215
    """Latents the DiT sees = encoder mean x scale_factor."""
    tile_px: int = 256
    tile_overlap: float = 0.25
    """Spatial tiles of 256 px overlapping a quarter, blended linearly (the reference's tiling)."""
    tile_frames: int = 12
    """Temporal tiles (no overlap): fps // 2 pixel frames at 24 fps, 3 latent frames."""

    def __post_init__(self) -> None:
        cube = self.patch_size**2 * self.patch_length
        _require(self.dim % self.num_heads == 0, "MAGI VAE dim must be a multiple of num_heads")
        _require(self.dim % cube == 0, f"MAGI VAE dim must be a multiple of its patch volume ({cube})")
        _require(self.tile_px % self.patch_size == 0, "MAGI VAE tile_px must be a multiple of patch_size")
        _require(self.tile_frames % self.patch_length == 0, "MAGI VAE tile_frames must be whole latent frames")

    @property
    def tile_latent_frames(self) -> int:
        return self.tile_frames // self.patch_length


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """The latent space: the Wan2.1 VAE (diffusers `AutoencoderKLWan`), or patchified pixels (demo)."""

    kind: str = "wan"
    """wan: the causal 3D VAE (Wan2.1: stride 4 x 8 x 8; Wan2.2: 4 x 16 x 16, see `pixel_patch`);
    patches: principal components of p x p pixel patches (engine/demo/pixels.py), one latent frame
    per video frame; magi: MAGI-1's transformer VAE (stride 4 x 8 x 8, 4 frames per latent frame;
    its sizes in `magi`)."""
    patch: int = 4
    """patches: patch size p (z_dim components of the 3 p^2 patch values)."""
    base_dim: int = 96
    """Encoder width (Wan2.1: 96; Wan2.2: 160)."""
    decoder_base_dim: int | None = None
    """Decoder width when it differs from the encoder's (Wan2.2: 256)."""
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    """Wan2.2: every level adds a parameter-free resampled shortcut around its residual blocks."""
    pixel_patch: int = 1
    """Wan2.2: 2. Pixels are folded p x p into channels before the encoder (3 -> 12 channels) and
    unfolded after the decoder, so the spatial stride is p x 2^(levels - 1) (2 x 8 = 16)."""
    latents_mean: tuple[float, ...] | None = None
    """Per-channel latent statistics; None means 'use the loaded VAE's own config'."""
    latents_std: tuple[float, ...] | None = None
    magi: MagiVaeConfig = field(default_factory=MagiVaeConfig)
    """magi: the transformer VAE's dimensions and tiling."""

    def __post_init__(self) -> None:
        _require(self.kind != "magi" or self.magi.z_dim == self.z_dim, "magi VAE: z_dim must equal magi.z_dim")
        _require(
            len(self.temporal_downsample) == len(self.dim_mult) - 1, "temporal_downsample needs len(dim_mult)-1 entries"
        )
        for stats in (self.latents_mean, self.latents_std):
            _require(stats is None or len(stats) == self.z_dim, "latents_mean/std need z_dim entries")
        _require(self.pixel_patch >= 1, "pixel_patch must be >= 1")

    @property
    def spatial_stride(self) -> int:
        if self.kind == "magi":
            return self.magi.patch_size
        return self.patch if self.kind == "patches" else self.pixel_patch * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        if self.kind == "magi":
            return self.magi.patch_length
        return 1 if self.kind == "patches" else 2 ** sum(self.temporal_downsample)

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames decoded from `latent_frames` causal latents: the first gives 1, the others `stride` each."""
        if self.kind == "patches":
            return latent_frames
        if self.kind == "magi":
            return self.temporal_stride * latent_frames
        return 0 if latent_frames == 0 else 1 + self.temporal_stride * (latent_frames - 1)

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames an encoder makes of `pixel_frames` frames (the inverse of `pixel_frames`,
        rounded down: frames past the last whole latent frame are not encoded)."""
        if self.kind == "patches":
            return pixel_frames
        if self.kind == "magi":
            return pixel_frames // self.temporal_stride
        return 0 if pixel_frames == 0 else 1 + (pixel_frames - 1) // self.temporal_stride


@dataclass(frozen=True, kw_only=True)
class TinyTextEncoder:
    """A randomly initialised umT5 (byte-level tokenizer) for tests and tiny presets."""

    d_model: int = 32
    d_ff: int = 64
    d_kv: int = 8
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Text conditioning: umT5 through transformers, or a learned word embedding (demo)."""

    text_len: int = 512
    """Tokens per prompt; embeddings are zero-padded to this length (as Wan does)."""
    tiny: TinyTextEncoder | None = None
    """If set, the preset builds a random tiny encoder instead of loading one from disk."""
    vocab: tuple[str, ...] | None = None
    """If set, prompts are words of this vocabulary, embedded by a learned table (the demo model)."""
    special_tokens: tuple[str, ...] = ()
    """MAGI-1: learned tokens prepended to every caption, as its run scripts do ("hq", "duration";
    engine/models/magi_tokens.py)."""

    def __post_init__(self) -> None:
        _require(self.text_len > 0, "text_len must be positive")
        _require(self.tiny is None or self.vocab is None, "choose a tiny umT5 or a vocabulary, not both")
        _require(set(self.special_tokens) <= {"hq", "duration"}, "special tokens are hq and duration")


SINK_MODES = ("fixed", "rebased")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Geometry of the stream and of its attention window."""

    height: int = 480
    width: int = 832
    frames_per_block: int = 3
    """Latent frames denoised together (Self-Forcing: 3)."""
    window_frames: int = 21
    """Latent frames one block may attend to, counting itself and the sink (Self-Forcing: 21)."""
    sink_frames: int = 0
    """The first frames of the stream that are never evicted (LongLive: 3)."""
    sink_mode: str = "fixed"
    """Where the sink's keys sit once the window slides: fixed (at their original positions 0..S-1,
    as Self-Forcing's and LongLive v1's released code keeps them) or rebased (moved to sit right
    before the oldest visible frame, Rolling Forcing's / LongLive's infinite-length variant)."""
    fps: int = 16
    """Playback rate of the decoded video."""

    def __post_init__(self) -> None:
        _require(self.frames_per_block > 0, "frames_per_block must be positive")
        _require(self.sink_frames >= 0, "sink_frames must be >= 0")
        _require(self.sink_mode in SINK_MODES, f"sink_mode must be one of {SINK_MODES}")
        _require(
            self.window_frames >= self.frames_per_block + self.sink_frames,
            f"window_frames ({self.window_frames}) must hold a block ({self.frames_per_block}) "
            f"plus the sink ({self.sink_frames})",
        )
        _require(self.fps > 0, "fps must be positive")

    @property
    def context_frames(self) -> int:
        """Committed frames visible to a block besides itself (sink + recent)."""
        return self.window_frames - self.frames_per_block

    @property
    def ring_frames(self) -> int:
        """Recent committed frames kept after the sink (a ring buffer in the KV cache)."""
        return self.context_frames - self.sink_frames


SOLVERS = ("self-forcing", "euler", "unipc", "unipc-skyreels")
SPACINGS = ("flow", "magi")
SCHEDULES = ("sequential", "pyramid", "cascade", "skyreels")
CONTEXTS = ("joint", "lagged")
SWITCHES = ("next-step", "recache")
ATTENTION = ("causal", "bidirectional")
COMPUTE = ("selective", "window")
CACHE_POLICIES = ("none", "teacache", "fbcache", "bwcache", "flowcache", "flowcache-skyreels", "scope")


@dataclass(frozen=True, kw_only=True)
class MagiGuidance:
    """MAGI-1's guidance (reference §2.5). Scales are looked up by the chunk's t = 1 - sigma in
    the buckets of `t_range`."""

    passes: int = 3
    """3 (base models): text + history, null caption + history, null caption alone; 1 (distilled)."""
    t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    nearly_clean_t: float | None = None
    """Distilled: once the oldest chunk's t exceeds this (0.3), its flow blends in a pass of the
    chunk alone (no history); None disables."""
    nearly_clean_weight: float = 0.7
    """Weight of the with-history flow in that blend."""

    def __post_init__(self) -> None:
        _require(self.passes in (1, 3), "MAGI-1 guidance runs 1 or 3 passes")
        _require(
            len(self.t_range) == len(self.prev_chunk_scales) == len(self.text_scales),
            "t_range, prev_chunk_scales and text_scales need one entry per bucket",
        )
        _require(list(self.t_range) == sorted(self.t_range), "t_range must increase")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Noise levels, solver and guidance (flow matching; sigma 1 = noise, 0 = clean)."""

    timesteps: tuple[float, ...] | None = (1000.0, 750.0, 500.0, 250.0)
    """Explicit steps in Wan's 0-1000 units (Self-Forcing style). Exclusive with num_steps."""
    num_steps: int | None = None
    """Evenly spaced flow sigmas, shifted, as diffusers' flow UniPC does (SkyReels-V2)."""
    shift: float = 5.0
    """Flow shift: sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    warp: bool = True
    """With explicit timesteps: pass them through the shifted schedule (Self-Forcing's warp)."""
    solver: str = "self-forcing"
    """self-forcing (x0, then re-noise), euler (flow ODE), unipc (multistep, per block) or
    unipc-skyreels (UniPC as SkyReels-V2's pipelines actually step it; see engine/solvers.py)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance; > 1 runs cond and uncond batched in one forward."""
    negative_prompt: str = ""
    commit_sigma: float = 0.0
    """Noise level of the pass that writes a finished block's K/V (Self-Forcing: context_noise 0)."""
    spacing: str = "flow"
    """With num_steps: flow (evenly spaced sigmas, shifted: diffusers' flow UniPC) or magi (MAGI-1's
    grid: t = linspace(0, 1)^2, shifted by 3 toward the noise end; 12 steps is the shortcut grid)."""
    shortcut: tuple[int, int, int] = (8, 16, 16)
    """magi, 12 steps: the three step sizes of each quarter of the grid, as fractions 1/n of it
    (MAGI-1's shortcut_mode "8,16,16")."""
    magi: MagiGuidance | None = None
    """MAGI-1's guidance (three passes, or the distilled single pass); None for Wan models."""

    def __post_init__(self) -> None:
        _require((self.timesteps is None) != (self.num_steps is None), "set exactly one of timesteps and num_steps")
        if self.timesteps is not None:
            _require(len(self.timesteps) > 0, "at least one denoising step is needed")
            _require(all(0 < t <= 1000 for t in self.timesteps), "timesteps must lie in (0, 1000]")
            _require(list(self.timesteps) == sorted(self.timesteps, reverse=True), "timesteps must decrease")
        else:
            _require(self.num_steps > 0, "num_steps must be positive")
        _require(self.shift > 0, "shift must be positive")
        _require(self.solver in SOLVERS, f"solver must be one of {SOLVERS}")
        _require(self.guidance_scale >= 1.0, "guidance_scale must be >= 1 (1 disables guidance)")
        _require(0.0 <= self.commit_sigma < 1.0, "commit_sigma must lie in [0, 1)")
        _require(self.spacing in SPACINGS, f"spacing must be one of {SPACINGS}")
        _require(self.spacing == "flow" or self.num_steps is not None, "the magi spacing needs num_steps")
        _require(abs(sum(1 / n for n in self.shortcut) - 0.25) < 1e-9, "shortcut step sizes must fill a quarter")
        _require(self.magi is None or not self.guided, "MAGI-1 guidance replaces guidance_scale")

    @property
    def steps(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else self.num_steps

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Which blocks denoise together, and how the blocks of one forward see each other."""

    schedule: str = "sequential"
    """sequential (one block at a time), pyramid (block b starts offset ticks after b-1), cascade
    (the pyramid with in-flight blocks spread over ranks; one process runs it as the pyramid) or
    skyreels (SkyReels-V2's timestep matrix over finite segments, with overlap for long videos)."""
    offset: int | None = None
    """pyramid/skyreels: ticks between the starts of consecutive blocks (SkyReels' ar_step; 0 = synchronous)."""
    attention: str = "causal"
    """Among the blocks of one forward: causal (block b sees blocks <= b) or bidirectional."""
    context: str = "joint"
    """How in-flight blocks see each other: joint (current K/V, as in one forward) or lagged (the
    other blocks' K/V from the previous tick, which a cascade sends once per tick)."""
    switch: str = "next-step"
    """How a prompt switch takes effect: next-step (in-flight blocks take the new prompt at their
    next step) or recache (sequential only: at the next block, after recomputing the recent window's
    K/V under the new prompt, as LongLive does)."""
    compute: str = "selective"
    """selective: run only blocks with work, committed context from the KV cache. window: rerun the
    whole window every tick (finished blocks at t=0, unstarted at full noise), as the reference does."""
    segment_frames: int | None = None
    """skyreels: latent frames per segment (base_num_frames); None = the whole video in one segment."""
    overlap_frames: int = 0
    """skyreels: latent frames of the previous segment kept as the next one's clean prefix."""
    addnoise_condition: float = 0.0
    """skyreels: noise (in 0-1000 units) put back on the clean prefix, as SkyReels-V2 does."""
    history_reach: tuple[int, ...] | None = None
    """Blocks (itself included) a denoising block may attend to, by stage: its steps split into
    len(history_reach) equal stages (MAGI-1's noise2clean_kvrange 5, 4, 3, 2). None: everything
    in the window."""
    commit_reach: int = 1
    """With history_reach: blocks a committing (clean) block attends to (MAGI-1: itself only)."""

    def __post_init__(self) -> None:
        _require(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}")
        _require(self.attention in ATTENTION, f"attention must be one of {ATTENTION}")
        _require(self.compute in COMPUTE, f"compute must be one of {COMPUTE}")
        _require(self.context in CONTEXTS, f"context must be one of {CONTEXTS}")
        _require(
            self.context == "joint" or self.compute == "selective",
            "lagged context needs --compute selective: --compute window has no in-flight K/V to lag",
        )
        _require(self.switch in SWITCHES, f"switch must be one of {SWITCHES}")
        _require(
            self.switch == "next-step" or self.schedule == "sequential",
            "--switch recache is for sequential plans: it reruns the window at a block boundary, and a "
            "pyramid or cascade has blocks in flight at every tick (they take a new prompt at their next step)",
        )
        _require(
            self.switch == "next-step" or self.compute == "selective",
            "--switch recache rewrites the KV cache: --compute window keeps none",
        )
        _require(self.offset is None or self.offset >= 0, "offset must be >= 0")
        _require(
            self.schedule == "sequential" or self.offset is not None, f"the {self.schedule} schedule needs an offset"
        )
        _require(self.overlap_frames >= 0 and self.addnoise_condition >= 0, "overlap and addnoise must be >= 0")
        _require(self.history_reach is None or min(self.history_reach, default=0) >= 1, "history_reach must be >= 1")
        _require(self.commit_reach >= 1, "commit_reach must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Feature caching per stream block (cache/): which policy, and how eagerly it skips."""

    policy: str = "none"
    """none, teacache, fbcache, bwcache, flowcache (MAGI-1 variant), flowcache-skyreels or scope."""
    threshold: float = 0.0
    """The policy's reuse threshold; 0 never reuses (output identical to no caching)."""
    warmup: int | None = None
    """Steps each block always computes first (None: 15% of the steps, at least 1)."""

    def __post_init__(self) -> None:
        _require(self.policy in CACHE_POLICIES, f"cache policy must be one of {CACHE_POLICIES}")
        _require(self.threshold >= 0, "cache threshold must be >= 0")
        _require(self.warmup is None or self.warmup >= 1, "cache warmup must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Everything that defines a runnable model, minus weights and runtime device choices."""

    name: str
    description: str
    model: ModelConfig
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    random_init: bool = False
    """True for presets whose weights are seeded random (tests); real presets need checkpoints."""
    bundled_weights: str | None = None
    """A folder of weights shipped inside the package (engine/weights/<name>), used by default."""

    def __post_init__(self) -> None:
        _require(self.model.in_channels == self.vae.z_dim, "model in_channels must equal the VAE's z_dim")
        stride = self.vae.spatial_stride * self.model.patch_size[1]
        _require(
            self.stream.height % stride == 0
            and self.stream.width % (self.vae.spatial_stride * self.model.patch_size[2]) == 0,
            f"{self.stream.height}x{self.stream.width} is not divisible by VAE stride x patch ({stride})",
        )
        if self.text.tiny is not None:
            _require(self.text.tiny.d_model == self.model.text_dim, "tiny text encoder width must equal text_dim")
        tile = self.vae.magi.tile_latent_frames
        _require(
            self.vae.kind != "magi" or self.stream.frames_per_block % tile == 0,
            f"MAGI-1's VAE decodes each chunk by itself: {self.stream.frames_per_block}-frame chunks must be "
            f"whole {tile}-frame temporal tiles",
        )
        _require(
            self.plan.switch == "next-step" or self.stream.sink_frames == 0,
            "--switch recache reruns the visible window in one forward, which a sink would split: "
            "use a preset without sink frames",
        )
        if self.cache.enabled:
            _require(
                self.plan.compute == "selective",
                "feature caching needs --compute selective: "
                "--compute window reruns every block each tick by definition",
            )
        _require(not self.text.special_tokens or self.model.special_tokens, "special caption tokens are MAGI-1's")
        self.model.check_preset(self)
        block = self.stream.frames_per_block
        for name in ("segment_frames", "overlap_frames"):
            value = getattr(self.plan, name)
            _require(
                value is None or value % block == 0, f"{name} ({value}) must be a whole number of {block}-frame blocks"
            )

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.vae.spatial_stride
        return self.stream.height // s, self.stream.width // s

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_hw
        return (h // self.model.patch_size[1]) * (w // self.model.patch_size[2])

    def latent_shape(self, frames: int, batch: int = 1) -> tuple[int, int, int, int, int]:
        h, w = self.latent_hw
        return batch, self.model.in_channels, frames, h, w

    def pixel_frames(self, blocks: int) -> int:
        return self.vae.pixel_frames(blocks * self.stream.frames_per_block)


COMPILE_MODES = ("off", "default", "graphs")
KV_STORAGES = ("model", "fp8")
ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")
TEXT_ENCODER_DEVICES = ("model", "cpu", "swap")
WEIGHT_STORAGES = ("native", "fp8")
OFFLOAD_MODES = ("none", "layers")
VAE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """How fast the same math runs on a device: not part of a Preset (the video does not depend on
    it beyond float rounding), chosen per process (engine/runtime/compiled.py, backends.py)."""

    compile: str = "off"
    """off (eager), default (torch.compile of the denoiser's forward, whole-graph) or graphs (the
    same with mode="reduce-overhead": CUDA graphs; CUDA only)."""
    kv_cache: str = "model"
    """Storage of the committed K/V: the model's dtype, or fp8 (half the memory of bf16)."""
    attention: str = "auto"
    """SDPA backend: auto (the fastest exact one the device has, chosen once and reported), or
    math, flash, efficient, cudnn."""
    text_encoder_device: str = "model"
    """Where the text encoder lives: model (on the model's device), cpu (kept and run in host memory;
    the embeddings move to the device) or swap (kept in host memory, moved to the device to encode a
    new prompt, moved back after)."""
    weights: str = "native"
    """Storage of the transformer blocks' Linear weights: native (the model's dtype) or fp8 (float8
    e4m3 with per-output-channel scales, dequantized to the compute dtype per matmul)."""
    offload: str = "none"
    """none (every block resident on the device) or layers (the transformer blocks kept in host memory,
    block i+1 copied to the device while block i computes; the same math as resident)."""
    vae_dtype: str = "float32"
    """The VAE's weights and decode (and video-in encode): float32, or bfloat16 (half the weights,
    the causal cache and the decode peak; frames differ by rounding). The Wan VAE and MAGI-1's
    honour it; the demo's patch codec (a few kilobytes, one matmul) stays float32."""

    def __post_init__(self) -> None:
        _require(self.compile in COMPILE_MODES, f"compile must be one of {COMPILE_MODES}")
        _require(self.kv_cache in KV_STORAGES, f"kv_cache must be one of {KV_STORAGES}")
        _require(self.attention in ATTENTION_BACKENDS, f"attention must be one of {ATTENTION_BACKENDS}")
        _require(
            self.text_encoder_device in TEXT_ENCODER_DEVICES,
            f"text_encoder_device must be one of {TEXT_ENCODER_DEVICES}",
        )
        _require(self.weights in WEIGHT_STORAGES, f"weights must be one of {WEIGHT_STORAGES}")
        _require(self.offload in OFFLOAD_MODES, f"offload must be one of {OFFLOAD_MODES}")
        _require(self.vae_dtype in VAE_DTYPES, f"vae_dtype must be one of {VAE_DTYPES}")
        _require(
            self.offload == "none" or self.compile == "off",
            "--offload layers rebinds each block's weights as it streams, which a compiled forward would "
            "trace as constants: use --compile off with --offload layers",
        )

    def check_device(self, device_type: str) -> None:
        """Refuse choices the device cannot run (one line, with the fix)."""
        _require(
            self.compile != "graphs" or device_type == "cuda",
            f"--compile graphs captures CUDA graphs; this run is on {device_type}: use --compile default",
        )
