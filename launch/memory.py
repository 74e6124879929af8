"""The memory plan: what every part of a run takes on the device, known before anything loads.

Counted on the meta device from the code that builds each part, so the plan cannot drift from
what loads: the transformer (`new_model` + `cast`, bytes per dtype, blocks apart from the rest),
the text encoder (`encoder_on_meta`: the folder's config, the random one, or umT5-XXL / T5-XXL
when no files are given), the VAE and its decoder's causal cache at float32 and bfloat16
(`decode_on_meta`: the decoder run on meta tensors), the KV cache (`stream_kv_cache`, the
executor's own sizing, bf16 or fp8).
Estimated, by formula (they are not tensors anyone keeps):

    activations = tokens x (8 dim + s (5 dim + 2 ffn))     one layer live: no autograd keeps the
        tokens = branches x frames in the largest forward x tokens per frame; 8 dim: the float32
        residual and its normed copy; 5 dim: q, k, v, attention out, projection; 2 ffn: the FFN's
        hidden and its activation; s: the dtype's bytes. The VAE's decode peak replaces it when
        larger: that one is measured, the decoder run on meta tensors with every tensor it makes
        counted until freed (engine/models/vae.py `LiveBytes`).
    prompt K/V  = 2 x layers x text_len x kv_heads x head_dim x s x branches   (cross-attention)
    workspace   = 1 GiB on a GPU (CUDA context, cuBLAS workspaces, allocator rounding), 256 MiB on a CPU

The options, cheapest to speed first (the search takes the cheapest set that fits):
    1 --text-encoder-device swap   nothing per frame; a prompt switch copies the encoder over
    2 --vae-dtype bfloat16         nothing per frame on a GPU; frames differ by rounding (docs/speed.md)
    3 --text-encoder-device cpu    nothing per frame; a prompt switch encodes on the CPU (seconds)
    4 --kv-cache fp8               a dequantise per layer read; fidelity measured (docs/speed.md)
    5 --weights fp8                a dequantise per Linear; block Linear weights e4m3 + float32 scales
    6 --offload layers             blocks in pinned host memory, one streamed ahead: PCIe-bound
A set's cost is the sum of 1, 2, 4, 8, 16, 32 for its options: any set without offload is cheaper
than any with it, and so on down the list. On a CPU the host is the device: moving parts to it
saves nothing, so only the fp8 options are searched (a bfloat16 VAE is left out there too: hosts
without bf16 units convert, several times slower than float32).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import Counter
from dataclasses import dataclass

import torch

from engine.config import Preset, TinyTextEncoder
from engine.devices import SetupError
from engine.footprint import available_bytes, size
from engine.loading import build_patch_codec, build_rope, missing_weights, new_model
from engine.models.random_init import SMALL_MODEL_PARAMS
from engine.models.text_encoder import REFERENCE_ENCODERS, encoder_on_meta
from engine.plan.sigmas import build_schedule
from engine.weight_paths import WeightPaths
from launch.parts import endless_blocks_in_forward, frames_in_forward, make_guidance, stream_kv_cache

GIB, MIB = 2**30, 2**20
RESIDENT_BLOCKS, SLOTS = 1, 2
"""--offload layers (engine/runtime/streamed_layers.py): the first block stays on the device (the
feature caches probe it), the others stream through two device slots."""
WORKSPACE = {"cuda": GIB, "cpu": 256 * MIB}
CHOICES = {
    "text_encoder": ("model", "swap", "cpu"),
    "kv_cache": ("model", "fp8"),
    "weights": ("native", "fp8"),
    "offload": ("none", "layers"),
    "vae": ("float32", "bfloat16"),
}
COSTS = {("text_encoder", "swap"): 1, ("vae", "bfloat16"): 2, ("text_encoder", "cpu"): 4, ("kv_cache", "fp8"): 8,
         ("weights", "fp8"): 16, ("offload", "layers"): 32}  # fmt: skip
FLAGS = {"text_encoder": "--text-encoder-device", "kv_cache": "--kv-cache", "weights": "--weights",
         "offload": "--offload", "vae": "--vae-dtype"}  # fmt: skip


@dataclass(frozen=True)
class Options:
    """The memory options of a run (their flags are named in FLAGS)."""

    text_encoder: str = "model"
    kv_cache: str = "model"
    weights: str = "native"
    offload: str = "none"
    vae: str = "float32"

    @property
    def cost(self) -> int:
        return sum(COSTS.get((name, value), 0) for name, value in dataclasses.asdict(self).items())

    def flags(self) -> str:
        """The flags that set what differs from the defaults ('' for none)."""
        changed = [f"{FLAGS[k]} {v}" for k, v in dataclasses.asdict(self).items() if v != CHOICES[k][0]]
        return " ".join(changed)

    def short(self) -> str:
        """For tables: 'as is', or e.g. 'te-cpu vae16 kv8 w8 off'."""
        names = {"swap": "te-swap", "cpu": "te-cpu"}
        parts = [names[self.text_encoder]] if self.text_encoder != "model" else []
        parts += ["vae16"] if self.vae == "bfloat16" else []
        parts += ["kv8"] if self.kv_cache == "fp8" else []
        parts += ["w8"] if self.weights == "fp8" else []
        parts += ["off"] if self.offload == "layers" else []
        return " ".join(parts) or "as is"


def options_of(*configs) -> Options:
    """The options set on the run's configs (the speed and weight configs carry them)."""
    fields = {"text_encoder": "text_encoder_device", "kv_cache": "kv_cache", "weights": "weights",
              "offload": "offload", "vae": "vae_dtype"}  # fmt: skip
    found = {}
    for name, attr in fields.items():
        for config in configs:
            value = getattr(config, attr, None)
            if isinstance(value, str) and value in CHOICES[name]:
                found[name] = value
    return Options(**found)


def all_options(device_type: str) -> list[Options]:
    """Every set, cheapest first (on a CPU only the fp8 ones: the host is the device there)."""
    names = list(CHOICES)
    sets = [Options(**dict(zip(names, values))) for values in itertools.product(*CHOICES.values())]
    if device_type == "cpu":
        sets = [s for s in sets if s.text_encoder == "model" and s.offload == "none" and s.vae == "float32"]
    return sorted(sets, key=lambda s: s.cost)


# -- counting (meta device) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Transformer:
    """The transformer's bytes as it loads at the run dtype (parameters and buffers)."""

    by_dtype: dict[str, int]
    """All of it, per dtype name."""
    blocks: int
    """The transformer blocks' share (what --offload streams, what --weights fp8 shrinks)."""
    largest_block: int
    linear_weights: int
    """Bytes of the blocks' Linear weights at their dtype ..."""
    linear_fp8: int
    """... and stored as e4m3 with a float32 scale per output channel."""
    params: int
    num_blocks: int

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())

    def _per_block(self, options: Options) -> int:
        shrink = self.linear_weights - self.linear_fp8 if options.weights == "fp8" else 0
        return self.largest_block - shrink * self.largest_block // max(self.blocks, 1)

    def device_bytes(self, options: Options) -> int:
        """On the device while denoising: all of it (the blocks' Linears in fp8 with --weights
        fp8), or with --offload layers the rest, the resident first block and two slots."""
        if options.offload == "none":
            return self.total - (self.linear_weights - self.linear_fp8 if options.weights == "fp8" else 0)
        return self.total - self.blocks + (RESIDENT_BLOCKS + SLOTS) * self._per_block(options)

    def host_bytes(self, options: Options) -> int:
        """The streamed blocks, kept in (pinned) host memory."""
        if options.offload == "none":
            return 0
        return (self.num_blocks - RESIDENT_BLOCKS) * self._per_block(options)


def count_transformer(preset: Preset, dtype: torch.dtype) -> Transformer:
    return _count_transformer(preset.model, dtype)


@functools.lru_cache(maxsize=32)
def _count_transformer(cfg, dtype: torch.dtype) -> Transformer:
    """Kept per config: a network depends on nothing else."""
    with torch.device("meta"):
        model = new_model(cfg)
    model.cast(dtype)  # on meta: sets each tensor's dtype as the load gives it
    in_blocks = {id(t) for t in (*model.blocks.parameters(), *model.blocks.buffers())}
    by_dtype, blocks = Counter(), 0
    for t in (*model.parameters(), *model.buffers()):
        by_dtype[_name(t.dtype)] += _nbytes(t)
        blocks += _nbytes(t) if id(t) in in_blocks else 0
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    return Transformer(
        by_dtype=dict(by_dtype),
        blocks=blocks,
        largest_block=max(sum(_nbytes(t) for t in (*b.parameters(), *b.buffers())) for b in model.blocks),
        linear_weights=sum(_nbytes(m.weight) for m in linears),
        linear_fp8=sum(m.weight.numel() + 4 * m.out_features for m in linears),
        params=sum(p.numel() for p in model.parameters()),
        num_blocks=len(model.blocks),
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_text_encoder(preset: Preset, weights: WeightPaths, dtype: torch.dtype) -> tuple[int, str]:
    """(bytes, name) of the prompt encoder `build_text_encoder` makes for these weights."""
    if preset.text.vocab is not None:  # a word table, as VocabEncoder builds it: kilobytes, built on the
        from engine.demo.vocab import WordEmbedding  # CPU (its init on meta would import torch's compiler)

        with torch.random.fork_rng(devices=[]):  # its random init leaves the global generator as it was
            table = WordEmbedding(len(preset.text.vocab), preset.model.text_dim, preset.text.text_len)
        return sum(_nbytes(t) for t in (*table.parameters(), *table.buffers())), "word table"
    folder = None if weights.random else weights.resolved("text_encoder")
    reference = "t5" if preset.text.special_tokens else "umt5"
    if folder is None and (preset.text.tiny is not None or weights.random):
        spec = preset.text.tiny or TinyTextEncoder(d_model=preset.model.text_dim, num_layers=1, seed=weights.seed)
        return _encoder_bytes(None, spec, reference, torch.float32), "random umT5"  # drawn in float32
    name = "umT5" if folder is not None else REFERENCE_ENCODERS[reference][0]
    return _encoder_bytes(folder, None, reference, dtype), name


def _encoder_bytes(folder, spec, reference: str, dtype: torch.dtype) -> int:
    if folder is None:  # nothing read from files: the same answer every time
        return _encoder_bytes_kept(spec, reference, dtype)
    return _encoder_bytes_of(encoder_on_meta(folder=folder), dtype)


@functools.lru_cache(maxsize=32)
def _encoder_bytes_kept(spec, reference: str, dtype: torch.dtype) -> int:
    return _encoder_bytes_of(encoder_on_meta(spec=spec, reference=reference), dtype)


def _encoder_bytes_of(encoder: torch.nn.Module, dtype: torch.dtype) -> int:
    # from_pretrained loads at `dtype`, keeping the T5 "wo" layers in float32 under float16 only
    total = sum(p.numel() * (4 if dtype == torch.float16 and ".wo." in n else dtype.itemsize)
                for n, p in encoder.named_parameters())  # fmt: skip
    return total + sum(_nbytes(b) for b in encoder.buffers())


def count_vae(preset: Preset, weights: WeightPaths, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(weights, one stream's decoder state, a block's decode peak above it) of the preset's decoder
    as `build_decoder` makes it at `dtype` (--vae-dtype; the demo's codec stays float32)."""
    if preset.vae.kind == "magi":  # its weights; its decode state and peak are not counted yet
        from engine.models.magi_vae import MagiVae

        with torch.device("meta"):
            vae = MagiVae(preset.vae.magi).to(dtype)
        return sum(_nbytes(t) for t in (*vae.parameters(), *vae.buffers())), 0, 0
    if preset.vae.kind == "patches":
        codec = build_patch_codec(preset, weights)
        return sum(_nbytes(t) for t in vars(codec).values() if isinstance(t, torch.Tensor)), 0, 0
    from engine.models.vae import decode_on_meta

    return decode_on_meta(preset.vae, preset.latent_shape(preset.stream.frames_per_block), dtype)


@dataclass(frozen=True)
class Counts:
    """Every part of one preset at one dtype, options aside."""

    preset: str
    device_type: str
    dtype: torch.dtype
    transformer: Transformer
    text_encoder: int
    text_encoder_name: str
    vae: dict[str, int]
    """The VAE's weights, per --vae-dtype (as `decode_state` and `decode_peak`)."""
    decode_state: dict[str, int]
    decode_peak: dict[str, int]
    kv: dict[str, int]
    prompt_kv: int
    activations: int
    tokens: int
    random_draw: int
    """float32 bytes of random weights drawn on the device (0 when loaded, or drawn on the CPU)."""
    workspace: int


def count(preset: Preset, weights: WeightPaths, dtype: torch.dtype, device_type: str, head_shards: int = 1) -> Counts:
    """Count every part of `preset` on the meta device (seconds for the largest presets)."""
    schedule = build_schedule(preset.sampling)
    branches = make_guidance(preset, schedule).branches
    transformer = count_transformer(preset, dtype)
    vae = {name: count_vae(preset, weights, getattr(torch, name)) for name in CHOICES["vae"]}
    text, text_name = count_text_encoder(preset, weights, dtype)
    tokens = branches * frames_in_forward(preset, schedule) * preset.tokens_per_frame
    random = weights.random or (preset.random_init and weights.resolved("transformer", preset) is None)
    return Counts(
        preset=preset.name, device_type=device_type, dtype=dtype, transformer=transformer,
        text_encoder=text, text_encoder_name=text_name, vae={n: v[0] for n, v in vae.items()},
        decode_state={n: v[1] for n, v in vae.items()}, decode_peak={n: v[2] for n, v in vae.items()},
        kv=_kv(preset, schedule, dtype, head_shards), prompt_kv=_prompt_kv(preset, dtype, branches),
        activations=_activations(preset, dtype, tokens // head_shards), tokens=tokens,
        random_draw=transformer.params * 4 if random and transformer.params >= SMALL_MODEL_PARAMS else 0,
        workspace=WORKSPACE.get(device_type, WORKSPACE["cuda"]),
    )  # fmt: skip


def _kv(preset: Preset, schedule, dtype: torch.dtype, head_shards: int) -> dict[str, int]:
    if preset.plan.compute == "window":  # the window is rerun every tick: no cache
        return {"model": 0, "fp8": 0}
    blocks, rope = endless_blocks_in_forward(preset, schedule), build_rope(preset, "cpu")
    return {storage: stream_kv_cache(preset, schedule, dtype, "meta", blocks_in_forward=blocks, rope=rope,
                                     head_shards=head_shards, storage=storage).nbytes
            for storage in ("model", "fp8")}  # fmt: skip


def _prompt_kv(preset: Preset, dtype: torch.dtype, branches: int) -> int:
    cfg = preset.model
    return 2 * cfg.num_layers * preset.text.text_len * cfg.kv_heads * cfg.head_dim * dtype.itemsize * branches


def _activations(preset: Preset, dtype: torch.dtype, tokens: int) -> int:
    cfg = preset.model
    ffn = cfg.ffn_dim * (2 if getattr(cfg, "gated_linear_unit", False) else 1)
    return tokens * (8 * cfg.dim + dtype.itemsize * (5 * cfg.dim + 2 * ffn))


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """Where every part goes under `options`, and whether the peak fits `budget` (None: unknown)."""

    counts: Counts
    options: Options
    budget: int | None

    @property
    def parts(self) -> list[Part]:
        c, o = self.counts, self.options
        t = c.transformer
        weights = ", ".join(f"{size(b)} {d}" for d, b in sorted(c.transformer.by_dtype.items()) if b)
        text_device = c.text_encoder if o.text_encoder == "model" else 0
        return [
            Part("transformer", t.device_bytes(o), t.host_bytes(o), _weights_note(weights, o)),
            Part("text encoder", text_device, c.text_encoder - text_device,
                 f"{c.text_encoder_name}{'' if o.text_encoder == 'model' else ', ' + o.text_encoder}"),
            Part("VAE", c.vae[o.vae], 0, o.vae),
            Part("KV cache", c.kv[o.kv_cache], 0, "fp8" if o.kv_cache == "fp8" else _name(c.dtype)),
            Part("stream state", c.decode_state[o.vae] + c.prompt_kv, 0, "decoder cache + prompt K/V"),
            Part("activations", self.activations, 0, f"largest tick: {c.tokens:,} tokens"),
            Part("workspace", c.workspace),
        ]  # fmt: skip

    @property
    def activations(self) -> int:
        return max(self.counts.activations, self.counts.decode_peak[self.options.vae])

    @property
    def phases(self) -> dict[str, int]:
        """The device's peak in each phase: a stream runs; the encoder swapped in; random weights drawn."""
        c, parts = self.counts, self.parts
        same_memory = sum(p.host for p in parts) if c.device_type == "cpu" else 0  # the host is the device
        resident = sum(p.device for p in parts if p.name != "activations") + same_memory
        phases = {"run": resident + self.activations}
        if self.options.text_encoder == "swap":
            phases["prompt switch"] = resident + (c.text_encoder if c.device_type != "cpu" else 0)
        if c.random_draw and self.options.offload == "none":  # streamed blocks are drawn on the host
            phases["random weights"] = c.random_draw + c.workspace
        if self.options.weights == "fp8" and self.options.offload == "none":
            phases["load"] = c.transformer.total + c.workspace  # loaded whole, then its blocks quantised
        return phases

    @property
    def needed(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.needed <= self.budget

    @property
    def per_session(self) -> int:
        """What one more stream adds: its KV cache and its state (decoder cache, prompt K/V)."""
        c = self.counts
        return c.kv[self.options.kv_cache] + c.decode_state[self.options.vae] + c.prompt_kv

    def sessions(self, batch: int = 1) -> int:
        """Streams that fit `budget` beside the model, `batch` of them coalesced in one forward."""
        if self.budget is None:
            raise ValueError("no budget to fit sessions into")
        fixed = self.needed - self.per_session
        n = 0
        while fixed + (n + 1) * self.per_session + min(batch - 1, n) * self.counts.activations <= self.budget:
            n += 1
        return n

    def line(self) -> str:
        """'needs 27.39 GiB (transformer 2.68 GiB + text encoder 10.58 GiB + ...)' for messages."""
        shown = " + ".join(f"{p.name} {size(p.device)}" for p in self.parts if p.device)
        return f"needs {size(self.needed)} ({shown})"


def _weights_note(weights: str, options: Options) -> str:
    notes = [weights] + (["block Linears fp8"] if options.weights == "fp8" else [])
    streamed = ["blocks streamed from the host: the first and 2 slots on the device"]
    return ", ".join(notes + (streamed if options.offload == "layers" else []))


def cheapest(counts: Counts, budget: int) -> MemoryPlan | None:
    """The cheapest set of options whose plan fits `budget` (None: none does)."""
    for options in all_options(counts.device_type):
        plan = MemoryPlan(counts, options, budget)
        if plan.fits:
            return plan
    return None


def device_budget(device: torch.device, gpu_memory: int | None) -> int | None:
    """--gpu-memory, capped by what the device has free (CUDA's free bytes; on a CPU the available
    host memory); without it, what the device has free (None: unknown, nothing is refused)."""
    free = available_bytes(device)
    if gpu_memory is None or free is None:
        return gpu_memory if free is None else free
    return min(gpu_memory, free)


def check(plan: MemoryPlan, device: torch.device | str) -> None:
    """Refuse a plan that cannot fit, in one line: what it needs, what the device has, what fits."""
    if plan.fits:
        return
    counts, budget = plan.counts, plan.budget
    start = f"preset {counts.preset} {plan.line()} on {device}, which has {size(budget)}"
    better = cheapest(counts, budget)
    if better is not None:
        shown = f" (python -m launch.presets --fit {counts.preset} --gpu-memory {budget / GIB:.0f}GiB: the plan)"
        shown = shown if counts.device_type == "cuda" and budget >= GIB else ""
        raise SetupError(f"{start}: with {better.options.flags()} it needs {size(better.needed)} and fits{shown}")
    searched = all_options(counts.device_type)
    least = min((MemoryPlan(counts, o, budget) for o in searched), key=lambda p: p.needed)
    tried = {(k, v) for o in searched for k, v in dataclasses.asdict(o).items() if v != CHOICES[k][0]}
    flags = ", ".join(f"{FLAGS[k]} {v}" for k, values in CHOICES.items() for v in values if (k, v) in tried)
    raise SetupError(f"{start}: no set of the options ({flags}) fits, the least needs {size(least.needed)}; "
                     "use a device with more memory or a smaller preset")  # fmt: skip


def plan_run(
    preset: Preset,
    weights: WeightPaths,
    device: torch.device,
    dtype: torch.dtype,
    *configs,
    gpu_memory: int | None = None,
    head_shards: int = 1,
) -> MemoryPlan:
    """The plan of a run about to be built, against the device's budget (`configs`: where the
    memory options are set). A part the weights do not give is refused first, as its builder would."""
    missing = missing_weights(preset, weights)
    if missing:
        raise SetupError(missing)
    counts = count(preset, weights, dtype, device.type, head_shards)
    return MemoryPlan(counts, options_of(*configs), device_budget(device, gpu_memory))
