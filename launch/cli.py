"""Command-line flags of generate, stream and the benches: one table, flag -> the config it sets.

Every row of `FLAGS` declares a flag, the field it sets (`plan.offset`, `weights.lora`, ...), its
help, an example the flag-walk test runs, and, where a flag only means something in some
settings, the check that refuses it elsewhere with the reason. Plan, sampling and cache flags
override fields of the preset's frozen configs through `dataclasses.replace`, so every override
passes the same validation as the presets themselves (a `ConfigError` says what is wrong).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cache import SUGGESTED_THRESHOLDS
from engine.config import (
    ATTENTION,
    ATTENTION_BACKENDS,
    CACHE_POLICIES,
    COMPILE_MODES,
    COMPUTE,
    CONTEXTS,
    KV_STORAGES,
    OFFLOAD_MODES,
    SCHEDULES,
    SINK_MODES,
    SOLVERS,
    SWITCHES,
    TEXT_ENCODER_DEVICES,
    VAE_DTYPES,
    WEIGHT_STORAGES,
    ConfigError,
    Preset,
    SpeedConfig,
)
from engine.devices import SetupError, resolve_device
from engine.footprint import parse_bytes
from engine.media import MediaError
from engine.models.checkpoints.wan import CheckpointError
from engine.weight_paths import WeightPaths
from launch.layouts import choose_layout
from launch.presets import PRESETS, get_preset
from launch.split import choose_split
from parallel.topology import ParallelConfig, Topology, TopologyError

DEFAULT_PRESET = "demo"
"""What the entry points run when no --preset is given: the shipped demo model."""
USER_ERRORS = (SetupError, CheckpointError, ConfigError, TopologyError, OSError, MediaError)
"""Errors the entry points report as a one-line message (exit code 2), not a traceback."""
ALIKE_ON_EVERY_RANK = (ConfigError, TopologyError)
"""User errors of the settings, which every rank of a job meets alike: said once, by rank 0."""


def say_user_error(err: BaseException) -> int:
    """Print a user error as one line (under torchrun, a settings error only from rank 0); exit code 2."""
    if not isinstance(err, ALIKE_ON_EVERY_RANK) or os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr)
    return 2


Check = Callable[[argparse.Namespace, Preset], str | None]
"""Why a given flag does not apply to the resulting settings (None: it does)."""


@dataclass(frozen=True)
class Flag:
    name: str
    sets: str
    """`section.field` of the preset (plan, sampling, cache), or weights.* / parallel.*."""
    help: str
    example: tuple[str, ...]
    """Arguments the flag-walk test passes (the flag with a value, and what it needs)."""
    type: Callable | None = None
    choices: tuple | None = None
    action: str | type | None = None
    applies: Check | None = None

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def given(self, args: argparse.Namespace) -> bool:
        """Whether the command line set this flag (store_true flags are False when absent)."""
        value = getattr(args, self.dest, None)
        return value is not None and not (self.action == "store_true" and value is False)


def _in_flight_only(flag: str) -> Check:
    def check(args, preset):
        if preset.plan.schedule == "sequential":
            return (
                f"{flag} changes nothing in a sequential plan (one block in flight): use --schedule pyramid or cascade"
            )
        return None

    return check


def _skyreels_only(flag: str) -> Check:
    def check(args, preset):
        return None if preset.plan.schedule == "skyreels" else f"{flag} needs --schedule skyreels (finite segments)"

    return check


def _not_sequential(args, preset):
    if preset.plan.schedule == "sequential":
        return "--offset needs --schedule pyramid, cascade or skyreels (sequential runs one block at a time)"
    return None


def _with_sink(args, preset):
    return None if preset.stream.sink_frames else "--sink-mode needs a preset with sink frames (e.g. longlive-1.3b)"


def _magi_tokens(args, preset):
    return None if preset.text.special_tokens else "--special-tokens goes with MAGI-1 presets (their caption tokens)"


def _with_auto(args, preset):
    return None if getattr(args, "parallel", None) == "auto" else "--link goes with --parallel auto"


def _guided(args, preset):
    if not preset.sampling.guided:
        return "--negative-prompt needs --guidance-scale > 1 (with guidance off only the prompt is used)"
    return None


def _cache_on(flag: str) -> Check:
    def check(args, preset):
        return None if preset.cache.enabled else f"{flag} needs --cache POLICY (no feature cache is on)"

    return check


def _with_lora(args, preset):
    return None if args.lora is not None else "--lora-alpha needs --lora FILE"


def _pt_checkpoint(args, preset):
    if args.checkpoint is None or args.checkpoint.suffix != ".pt":
        return "--ema/--no-ema choose between the generator and generator_ema of a Self-Forcing-style .pt checkpoint"
    return None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _memory_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _timesteps(text: str) -> tuple[float, ...]:
    """ "1000,750,500,250" -> (1000.0, 750.0, 500.0, 250.0): a Self-Forcing-style step ladder."""
    example = "e.g. 1000,750,500,250"
    try:
        steps = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give comma-separated numbers in (0, 1000], {example}; got {text!r}"
        ) from None
    if not all(0 < t <= 1000 for t in steps) or list(steps) != sorted(set(steps), reverse=True):
        raise argparse.ArgumentTypeError(f"steps must decrease and lie in (0, 1000], {example}; got {text!r}")
    return steps


_SEQ = ("--schedule", "pyramid", "--offset", "1")
FLAGS: tuple[Flag, ...] = (
    # plan
    Flag(
        "--schedule",
        "plan.schedule",
        "sequential, pyramid, cascade (over ranks) or skyreels",
        ("--schedule", "pyramid", "--offset", "2"),
        choices=SCHEDULES,
    ),
    Flag(
        "--offset",
        "plan.offset",
        "ticks between block starts (SkyReels ar_step; 0 = synchronous)",
        _SEQ,
        type=int,
        applies=_not_sequential,
    ),
    Flag(
        "--context",
        "plan.context",
        "in-flight blocks see current (joint) or last tick's (lagged) K/V",
        (*_SEQ, "--context", "lagged"),
        choices=CONTEXTS,
        applies=_in_flight_only("--context"),
    ),
    Flag(
        "--switch",
        "plan.switch",
        "prompt switch: next-step, or recache (LongLive; sequential)",
        ("--switch", "recache"),
        choices=SWITCHES,
    ),
    Flag(
        "--window-attention",
        "plan.attention",
        "attention among the blocks of one forward",
        (*_SEQ, "--window-attention", "bidirectional"),
        choices=ATTENTION,
        applies=_in_flight_only("--window-attention"),
    ),
    Flag(
        "--compute",
        "plan.compute",
        "selective (blocks with work, KV cache) or window (rerun all)",
        ("--compute", "window"),
        choices=COMPUTE,
    ),
    Flag(
        "--segment-frames",
        "plan.segment_frames",
        "skyreels: latent frames per segment (base_num_frames)",
        ("--schedule", "skyreels", "--offset", "1", "--segment-frames", "6"),
        type=int,
        applies=_skyreels_only("--segment-frames"),
    ),
    Flag(
        "--overlap-frames",
        "plan.overlap_frames",
        "skyreels: latent frames carried into the next segment",
        ("--schedule", "skyreels", "--offset", "1", "--segment-frames", "9", "--overlap-frames", "3"),
        type=int,
        applies=_skyreels_only("--overlap-frames"),
    ),
    Flag(
        "--addnoise-condition",
        "plan.addnoise_condition",
        "skyreels: noise put back on the clean prefix (0-1000)",
        ("--schedule", "skyreels", "--offset", "1", "--addnoise-condition", "20"),
        type=float,
        applies=_skyreels_only("--addnoise-condition"),
    ),
    Flag(
        "--sink-mode",
        "stream.sink_mode",
        "where sink frames' keys sit once the window slides: fixed (0..S-1) or rebased (before the window)",
        ("--preset", "tiny-wan", "--sink-mode", "rebased"),
        choices=SINK_MODES,
        applies=_with_sink,
    ),
    # sampling
    Flag(
        "--steps",
        "sampling.num_steps",
        "number of evenly spaced flow steps (replaces explicit timesteps)",
        ("--steps", "8"),
        type=int,
    ),
    Flag(
        "--timesteps",
        "sampling.timesteps",
        "explicit steps in 0-1000, comma-separated, warped by the shift (replaces --steps and the preset's)",
        ("--timesteps", "1000,750,500,250,100"),
        type=_timesteps,
    ),
    Flag("--shift", "sampling.shift", "flow shift", ("--shift", "3"), type=float),
    Flag("--solver", "sampling.solver", "the per-block solver", ("--solver", "euler"), choices=SOLVERS),
    Flag(
        "--guidance-scale",
        "sampling.guidance_scale",
        "classifier-free guidance (1 = off)",
        ("--guidance-scale", "3"),
        type=float,
    ),
    Flag(
        "--negative-prompt",
        "sampling.negative_prompt",
        "prompt of the unconditional branch",
        ("--guidance-scale", "3", "--negative-prompt", "blurry"),
        applies=_guided,
    ),
    # feature caching
    Flag("--cache", "cache.policy", "per-block feature cache policy", ("--cache", "flowcache"), choices=CACHE_POLICIES),
    Flag(
        "--cache-threshold",
        "cache.threshold",
        "reuse threshold; 0 never reuses (default with --cache: the policy's suggested one)",
        ("--cache", "teacache", "--cache-threshold", "0.7"),
        type=float,
        applies=_cache_on("--cache-threshold"),
    ),
    Flag(
        "--cache-warmup",
        "cache.warmup",
        "steps each block always computes first",
        ("--cache", "flowcache", "--cache-warmup", "2"),
        type=int,
        applies=_cache_on("--cache-warmup"),
    ),
    # weights
    Flag(
        "--checkpoint",
        "weights.checkpoint",
        "transformer weights: diffusers folder, Wan .safetensors/.pth, Self-Forcing .pt",
        ("--checkpoint", "model.pt"),
        type=Path,
    ),
    Flag(
        "--base",
        "weights.base",
        "Wan2.1 diffusers folder with text_encoder/, tokenizer/, vae/",
        ("--base", "wan"),
        type=Path,
    ),
    Flag(
        "--text-encoder",
        "weights.text_encoder",
        "umT5 transformers folder (overrides --base)",
        ("--text-encoder", "t5"),
        type=Path,
    ),
    Flag(
        "--tokenizer",
        "weights.tokenizer",
        "tokenizer folder (default: beside the text encoder)",
        ("--tokenizer", "tok"),
        type=Path,
    ),
    Flag(
        "--vae",
        "weights.vae",
        "VAE: diffusers folder or Wan2.1_VAE.pth (overrides --base)",
        ("--vae", "vae.pth"),
        type=Path,
    ),
    Flag(
        "--lora",
        "weights.lora",
        "LoRA adapter merged into the transformer (LongLive's lora.pt)",
        ("--lora", "lora.pt"),
        type=Path,
    ),
    Flag(
        "--lora-alpha",
        "weights.lora_alpha",
        "LoRA alpha (default: the rank, i.e. scale 1)",
        ("--lora", "lora.pt", "--lora-alpha", "8"),
        type=float,
        applies=_with_lora,
    ),
    Flag(
        "--ema",
        "weights.ema",
        "Self-Forcing .pt: use generator_ema (default when present) or generator",
        ("--checkpoint", "m.pt", "--no-ema"),
        action=argparse.BooleanOptionalAction,
        applies=_pt_checkpoint,
    ),
    Flag(
        "--special-tokens",
        "weights.special_tokens",
        "MAGI-1: special_tokens.npz of its code repository (the caption tokens its run scripts prepend)",
        ("--preset", "magi-1-4.5b", "--special-tokens", "special_tokens.npz"),
        type=Path,
        applies=_magi_tokens,
    ),
    Flag(
        "--random-weights",
        "weights.random",
        "seeded random weights for every part (timing runs)",
        ("--random-weights",),
        action="store_true",
    ),
    # ranks
    Flag(
        "--decode-rank",
        "parallel.decode_rank",
        "under torchrun: the last rank only decodes and writes",
        ("--decode-rank",),
        action="store_true",
    ),
    Flag(
        "--timeout",
        "parallel.timeout_s",
        "under torchrun: seconds before a silent peer ends the job",
        ("--timeout", "30"),
        type=float,
    ),
    Flag(
        "--sp",
        "parallel.sp",
        "under torchrun: Ulysses sequence-parallel ranks sharing each forward (of every plan; with "
        "--schedule cascade, of each stage); must divide the attention heads, any video size",
        ("--sp", "2"),
        type=_positive_int,
    ),
    Flag(
        "--replicas",
        "parallel.replicas",
        "under torchrun, serving sessions: rank groups of equal size, each a cascade x sp serving its own "
        "sessions (default: 1, one group of every rank)",
        ("--replicas", "2"),
        type=_positive_int,
    ),
    Flag(
        "--sp-backend",
        "parallel.sp_backend",
        "the sp all-to-all: yunchang's, torch's, or auto (yunchang when installed)",
        ("--sp-backend", "torch"),
        choices=("auto", "yunchang", "torch"),
    ),
    Flag(
        "--parallel",
        "process.parallel",
        "under torchrun: auto picks cascade x sp (+ decode rank) for the processes started, by the "
        "throughput model (launch/split.py), and says why; overrides --sp and --decode-rank",
        ("--parallel", "auto"),
        choices=("auto",),
    ),
    Flag(
        "--link",
        "process.link",
        "with --parallel auto: the link between GPUs (default: nvlink on one host, ib across hosts)",
        ("--parallel", "auto", "--link", "pcie"),
        choices=("nvlink", "pcie", "ib"),
        applies=_with_auto,
    ),
    # speed (the same math, faster on this device)
    Flag(
        "--compile",
        "speed.compile",
        "compile the denoiser's forward whole-graph: default (torch.compile) or graphs (CUDA graphs)",
        ("--compile", "default"),
        choices=COMPILE_MODES,
    ),
    Flag(
        "--kv-cache",
        "speed.kv_cache",
        "storage of the committed K/V: the model's dtype, or fp8",
        ("--kv-cache", "fp8"),
        choices=KV_STORAGES,
    ),
    Flag(
        "--attention-backend",
        "speed.attention",
        "SDPA backend; auto: the fastest exact one the device has (said at start)",
        ("--attention-backend", "math"),
        choices=ATTENTION_BACKENDS,
    ),
    # memory (what the device holds)
    Flag(
        "--text-encoder-device",
        "speed.text_encoder_device",
        "where the text encoder lives: model (its device), cpu (encodes on the host) or swap (moved to the "
        "device to encode a new prompt, then back)",
        ("--text-encoder-device", "cpu"),
        choices=TEXT_ENCODER_DEVICES,
    ),
    Flag(
        "--weights",
        "speed.weights",
        "the transformer blocks' Linear weights: native (the model's dtype) or fp8 (e4m3, per-channel scales; "
        "computed in the model's dtype)",
        ("--weights", "fp8"),
        choices=WEIGHT_STORAGES,
    ),
    Flag(
        "--offload",
        "speed.offload",
        "layers: transformer blocks kept in host memory, each copied to the device while the one before "
        "computes (the same output as resident)",
        ("--offload", "layers"),
        choices=OFFLOAD_MODES,
    ),
    Flag(
        "--vae-dtype",
        "speed.vae_dtype",
        "the VAE's weights and decode: float32, or bfloat16 (half its memory; frames differ by rounding; "
        "the demo's patch codec stays float32)",
        ("--vae-dtype", "bfloat16"),
        choices=VAE_DTYPES,
    ),
    # this process
    Flag(
        "--gpu-memory",
        "process.gpu_memory",
        "device memory the run may use, e.g. 24GiB, 24GB, 512MiB: the memory plan is checked against it "
        "before anything loads, and sessions are admitted within it (default: what the device has free; on "
        "a CPU the host's available memory; python -m launch.presets --fit PRESET shows the plan)",
        ("--gpu-memory", "64GiB"),
        type=_memory_size,
    ),
    Flag(
        "--threads",
        "process.threads",
        "CPU threads of this process (launch/threads.py: 1 for small models on a CPU, else torch's)",
        ("--threads", "2"),
        type=_positive_int,
    ),
)
GROUPS = {
    "plan": "plan",
    "stream": "plan",
    "sampling": "plan",
    "cache": "feature caching (cache/)",
    "weights": "weights",
    "parallel": "ranks (under torchrun)",
    "speed": "speed and memory (the same model on this device)",
    "process": "this process",
}
FLAG_BY_DEST = {flag.dest: flag for flag in FLAGS}
PARALLEL_DEFAULTS = ParallelConfig()
SPEED_DEFAULTS = SpeedConfig()


UNSET_MEANS = {
    "plan.offset": "none, one block at a time",
    "plan.segment_frames": "none, one segment",
    "cache.warmup": "none, 15%% of the steps",  # argparse expands %: %% prints one
}
"""What a preset field left unset (None) means, for --help."""


def _default_text(flag: Flag, preset: Preset) -> str:
    section, field = flag.sets.split(".")
    if section in ("plan", "sampling", "cache", "stream"):
        value = preset.sampling.steps if field == "num_steps" else getattr(getattr(preset, section), field)
        shown = UNSET_MEANS.get(flag.sets, "none") if value is None else repr(value)
        return f"the preset's; {preset.name}: {shown}"
    if section == "parallel":
        return str(getattr(PARALLEL_DEFAULTS, field))
    if section == "speed":
        return str(getattr(SPEED_DEFAULTS, field))
    if section == "process":
        return "chosen by the policy"
    return "the preset's bundled weights" if field in ("checkpoint", "text_encoder", "vae") else "none"


def _help_text(flag: Flag, preset: Preset) -> str:
    """The flag's help with its default, unless the help already says it; a switch is off."""
    if "(default" in flag.help:
        return flag.help
    default = "off" if flag.action == "store_true" else _default_text(flag, preset)
    return f"{flag.help} (default: {default})"


def add_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """Declare the table's flags of `sections` (defaults shown from the default preset)."""
    preset, groups = get_preset(DEFAULT_PRESET), {}
    for flag in FLAGS:
        section = flag.sets.split(".")[0]
        if section not in sections:
            continue
        title = GROUPS[section]
        group = groups.setdefault(title, parser.add_argument_group(title))
        kwargs = {"help": _help_text(flag, preset), "default": None}
        if flag.action is not None:
            kwargs["action"] = flag.action
        if flag.action == "store_true":
            kwargs["default"] = False
        if flag.type is not None:
            kwargs["type"] = flag.type
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        group.add_argument(flag.name, **kwargs)


def add_preset_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_PRESET) -> None:
    parser.add_argument("--preset", default=default, help=f"model preset, one of {', '.join(sorted(PRESETS))} "
                        f"(default: {default})")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bf16 on GPU, float32 on CPU (default: %(default)s)")  # fmt: skip


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ("weights",))


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ("plan", "stream", "sampling", "cache"))


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ("parallel", "process"))


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ("speed",))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command that runs a preset takes after its own flags: weights, plan, ranks, speed."""
    add_weight_arguments(parser)
    add_plan_arguments(parser)
    add_parallel_arguments(parser)
    add_speed_arguments(parser)


def _given(args: argparse.Namespace, section: str) -> dict:
    """{field: value} of the flags of `section` that were given."""
    return {flag.sets.split(".")[1]: getattr(args, flag.dest) for flag in FLAGS
            if flag.sets.split(".")[0] == section and flag.given(args)}  # fmt: skip


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The preset named by --preset with the plan/sampling/cache flags applied (validated), after
    refusing flags that would change nothing in the resulting settings."""
    preset = get_preset(args.preset)
    sampling = _given(args, "sampling")
    if "num_steps" in sampling and "timesteps" in sampling:
        raise ConfigError("--steps and --timesteps both set the sampler's steps: give one")
    if "num_steps" in sampling:
        sampling["timesteps"] = None
    elif "timesteps" in sampling:
        sampling["num_steps"] = None
    cache = _given(args, "cache")
    if cache.get("policy", "none") != "none" and "threshold" not in cache:
        cache["threshold"] = SUGGESTED_THRESHOLDS[cache["policy"]]
    preset = dataclasses.replace(
        preset,
        plan=dataclasses.replace(preset.plan, **_given(args, "plan")),
        stream=dataclasses.replace(preset.stream, **_given(args, "stream")),
        sampling=dataclasses.replace(preset.sampling, **sampling),
        cache=dataclasses.replace(preset.cache, **cache),
    )
    refuse_inapplicable(args, preset)
    return preset


def refuse_inapplicable(args: argparse.Namespace, preset: Preset) -> None:
    for flag in FLAGS:
        if flag.applies is not None and flag.given(args):
            reason = flag.applies(args, preset)
            if reason:
                raise ConfigError(reason)


def weights_from_args(args: argparse.Namespace) -> WeightPaths:
    given = _given(args, "weights")
    return WeightPaths(**{**given, "random": bool(getattr(args, "random_weights", False))})


def parallel_from_args(args: argparse.Namespace, preset: Preset | None = None) -> ParallelConfig:
    """The ranks' layout: the flags', or with --parallel auto the throughput model's pick for the
    processes torchrun started (said once, on rank 0)."""
    given = _given(args, "parallel")
    if getattr(args, "parallel", None) != "auto" or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return dataclasses.replace(PARALLEL_DEFAULTS, **given)
    if {"sp", "decode_rank"} & set(given):
        raise ConfigError("--parallel auto chooses --sp and --decode-rank itself: leave them out")
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    link = args.link or ("nvlink" if local == world else "ib")
    preset = preset or get_preset(args.preset)
    if getattr(args, "shared_stream", True) is False:  # a sessions server: replicas too
        return _sessions_layout(args, preset, world, link, given)
    try:
        choice = choose_split(preset, world, link, offset=preset.plan.offset or 1, context=preset.plan.context,
                              one_stage=preset.plan.schedule != "cascade")  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"--parallel auto: {err}") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"--parallel auto: {choice.reason}", file=sys.stderr)
    split = choice.split
    return dataclasses.replace(PARALLEL_DEFAULTS, **given, sp=split.sp, decode_rank=split.decode_rank)


def _sessions_layout(args: argparse.Namespace, preset: Preset, world: int, link: str, given: dict) -> ParallelConfig:
    """--parallel auto for a sessions server: replicas x (cascade x sp) by launch/layouts.py (cascade
    stages only with --schedule cascade, which they need)."""
    if "replicas" in given:
        raise ConfigError("--parallel auto chooses --replicas itself: leave it out")
    # without --schedule and --offset a group of stages runs the cascade plan (launch/stream.py sessions_preset)
    cascade = preset.plan.schedule == "cascade" or (args.schedule is None and args.offset is None)
    try:
        choice = choose_layout(preset, world, link, cascade=cascade, offset=preset.plan.offset or 1,
                               context=preset.plan.context)  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"--parallel auto: {err}") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"--parallel auto: {choice.reason}", file=sys.stderr)
    layout = choice.layout
    return dataclasses.replace(PARALLEL_DEFAULTS, **given, sp=layout.split.sp, replicas=layout.replicas)


def speed_from_args(args: argparse.Namespace) -> SpeedConfig:
    """The speed flags given (validated; device checks come when the session is built)."""
    return dataclasses.replace(SPEED_DEFAULTS, **_given(args, "speed"))


def process_from_args(args: argparse.Namespace) -> dict:
    """Settings of this process only (not of the stream): {"threads": N, "gpu_memory": bytes} when given."""
    return _given(args, "process")


def single_process_notes(args: argparse.Namespace, topology: Topology) -> list[str]:
    """Rank flags given to one process: said, not silently dropped."""
    if topology.distributed:
        return []
    rank_flags = ("decode_rank", "timeout", "sp", "sp_backend", "replicas", "parallel", "link")
    given = [FLAG_BY_DEST[d] for d in rank_flags if FLAG_BY_DEST[d].given(args)]
    return [f"{flag.name} applies to runs under torchrun; this is one process" for flag in given]


def rank_device(args: argparse.Namespace, topology: Topology) -> torch.device:
    """The device a rank runs on: its own under torchrun, else --device."""
    return topology.device if topology.distributed else resolve_device(args.device)
