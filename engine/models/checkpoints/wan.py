"""Read Wan transformer weights in every released layout and load them into `WanModel`.

Layouts (detected from the path and the keys, not from file names alone):
* diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards with a
  `*.safetensors.index.json`; a pipeline root with a `transformer/` folder also works;
* Wan-native: one `.safetensors` / `.pth` file or shards with an index (Wan-AI repos, Krea's file
  with a `model.` prefix);
* Self-Forcing-style `.pt` dicts (Self-Forcing, CausVid, LongLive 1.0 and 2.0, Rolling Forcing): the
  weights under `generator_ema` or `generator` (LongLive-2.0 also: `model`, or the bare state
  dict), keys prefixed `model.`, EMA keys with `_fsdp_wrapped_module.` segments.

Every key ends up in Wan-native names (our model's names). Anything that does not fit exactly
(missing, unexpected, wrong shape, unreadable file, a dtype that is not floating point, NaN/inf
values) raises `CheckpointError` in one line naming the file and the keys.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.models.checkpoints.streaming import (
    Edit,
    Entry,
    Stored,
    safetensors_entries,
    stream_into,
    unreadable_safetensors,
    value_of,
)
from engine.models.checkpoints.validate import CheckpointError, first_line, first_problem

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Wrapper prefixes seen in released files: ComfyUI/Wan repacks, torch.compile, DDP, the
# Self-Forcing wrapper ("model."), peft ("base_model.model."), diffusers LoRA ("transformer.").
STRIPPED_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "_orig_mod.",
    "module.",
    "model.",
)
MAX_LISTED_KEYS = 8

# diffusers -> Wan-native, outside the transformer blocks
TOP_LEVEL_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("fps_projection.net.0.proj.", "fps_projection.0."),  # SkyReels-V2 DF 1.3B
    ("fps_projection.net.2.", "fps_projection.2."),
)

# diffusers -> Wan-native, inside `blocks.N.`
BLOCK_RENAMES = (
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    # The affine LayerNorm before cross-attention is diffusers' norm2 but Wan's norm3; the two
    # parameter-free norms (Wan norm2 = diffusers norm3) have no keys.
    ("norm2.", "norm3."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")


@dataclass
class Checkpoint:
    """Weights in Wan-native names, with where they came from. Opened, `state` holds entries read
    on demand (`streaming.Entry`) or mapped tensors; `read_all()` reads every value."""

    source: Path
    layout: str  # "diffusers", "wan" or "self-forcing:<key>"
    files: list[Path]
    state: dict[str, Stored]
    file_keys: dict[str, str] = field(default_factory=dict)
    """Our key -> the key as stored in the file (for messages)."""

    def describe(self) -> str:
        return f"{self.source} ({self.layout}, {len(self.files)} file(s), {len(self.state)} tensors)"

    def read_all(self) -> Checkpoint:
        """This checkpoint with every value read (views of the files where they allow it)."""
        return replace(self, state={key: value_of(value) for key, value in self.state.items()})

    def file_of(self, stored_key: str) -> Path:
        """The file holding `stored_key`: its entry's, the only file, the shard whose header lists
        it, else the path the user gave. Only for messages (reads shard headers, not tensors)."""
        ours = next((k for k, v in self.file_keys.items() if v == stored_key), stored_key)
        if isinstance(self.state.get(ours), Entry):
            return self.state[ours].file
        if len(self.files) == 1:
            return self.files[0]
        for shard in self.files:
            if shard.name.endswith(".safetensors"):
                with safe_open(str(shard), framework="pt") as f:
                    if stored_key in f.keys():
                        return shard
        return self.source


# -- key maps ----------------------------------------------------------------------------------


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def diffusers_to_wan(key: str) -> str:
    """`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight`; unknown keys pass through."""
    match = _BLOCK_KEY.match(key)
    if match:
        return f"blocks.{match.group(1)}.{_rename(match.group(2), BLOCK_RENAMES)}"
    return _rename(key, TOP_LEVEL_RENAMES)


def wan_to_diffusers(key: str) -> str:
    """The inverse of `diffusers_to_wan`."""
    inverse_top = tuple((new, old) for old, new in TOP_LEVEL_RENAMES)
    inverse_block = tuple((new, old) for old, new in BLOCK_RENAMES)
    match = _BLOCK_KEY.match(key)
    if match:
        return f"blocks.{match.group(1)}.{_rename(match.group(2), inverse_block)}"
    return _rename(key, inverse_top)


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def normalize_keys(state: dict[str, Stored]) -> dict[str, Stored]:
    """Strip wrapper prefixes and FSDP segments, drop RoPE tables, map diffusers names."""
    out = {}
    for key, value in state.items():
        key = key.replace("_fsdp_wrapped_module.", "")
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        if key == "freqs" or key.endswith(".freqs"):
            continue  # Wan keeps its RoPE table in the state dict; ours is computed
        out[key] = value
    if is_diffusers_layout(out):
        out = {diffusers_to_wan(k): v for k, v in out.items()}
    return out


# -- reading files -----------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `path` at once (small files: LoRA adapters, VAEs)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncation/corruption
        raise unreadable_safetensors(path, err) from err


def _torch_load(path: Path):
    # The weights-only unpickler warns about the pickle protocol before failing on foreign files.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    detail = first_line(err)
    if "global" in detail.lower():
        return CheckpointError(
            f"{path}: holds pickled Python objects, not only tensors ({detail}); arcade never runs code "
            "from a checkpoint: save the state dict alone (torch.save(model.state_dict())) or as .safetensors"
        )
    return CheckpointError(
        f"{path}: cannot read torch checkpoint ({type(err).__name__}: {detail}); the file is damaged "
        "or of another format: download it again"
    )


def read_torch(path: Path) -> dict:
    try:
        data = _torch_load(path)
    except Exception as err:
        raise _unreadable(path, err) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def _read_index(
    index: Path,
    read: Callable[[Path], dict[str, Stored]] = safetensors_entries,
    stored: Callable[[Path], Path] = lambda shard: shard,
) -> tuple[dict[str, Stored], list[Path]]:
    """Every shard an index lists, opened. `stored(shard)`: the file holding it (MAGI-1 may keep
    `shard.zst`); `read(shard)`: its tensors or entries (default: plain safetensors' headers)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({index.parent / str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
    files = [stored(shard) for shard in shards]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {missing}")
    state: dict[str, Stored] = {}
    for shard in shards:
        state.update(read(shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(
            f"{index}: keys listed in the index are absent from the shards: {absent[:MAX_LISTED_KEYS]}"
        )
    return state, files


def _select_generator(data: dict, path: Path, ema: bool | None) -> tuple[dict, str]:
    """Self-Forcing-style dicts keep weights under generator / generator_ema (and a critic);
    LongLive-2.0's loader also accepts them under `model`."""
    if "generator" not in data and "generator_ema" not in data:
        if isinstance(data.get("model"), dict):  # never a tensor's key: those are "model.<name>"
            return data["model"], "self-forcing:model"
        return data, "wan"
    if ema is None:
        ema = "generator_ema" in data
    key = "generator_ema" if ema else "generator"
    if key not in data:
        raise CheckpointError(f"{path}: no '{key}' entry (has: {sorted(data)[:MAX_LISTED_KEYS]})")
    return data[key], f"self-forcing:{key}"


def _weights_in_folder(folder: Path) -> Path | list[Path]:
    """The index, the single file, or (as SkyReels-V2's loader reads them) a complete shard set."""
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a diffusers pipeline root
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(singles) == 1:
        return singles[0]
    if not indexes and singles:
        return _complete_shards(folder, singles)
    found = [p.name for p in indexes + singles]
    raise CheckpointError(
        f"{folder}: expected one *.safetensors file or one *.safetensors.index.json, found {found or 'none'}"
    )


def _complete_shards(folder: Path, files: list[Path]) -> list[Path]:
    matches = [_SHARD_NAME.match(f.name) for f in files]
    if not all(matches) or len({(m["stem"], m["total"]) for m in matches}) != 1:
        raise CheckpointError(f"{folder}: several *.safetensors that are not one shard set: {[f.name for f in files]}")
    total = int(matches[0]["total"])
    present = {int(m["index"]) for m in matches}
    missing = sorted(set(range(1, total + 1)) - present)
    if missing:
        raise CheckpointError(f"{folder}: shard files missing: numbers {missing} of {total}")
    return files


def read_checkpoint(path: str | Path, *, ema: bool | None = None) -> Checkpoint:
    """Read a transformer checkpoint in any supported layout; keys come back in Wan-native names.

    `ema`: for Self-Forcing-style dicts, pick `generator_ema` (True) or `generator` (False);
    None prefers the EMA weights when present, as the streaming demos of those projects do.
    """
    return open_checkpoint(path, ema=ema).read_all()


def open_checkpoint(path: str | Path, *, ema: bool | None = None) -> Checkpoint:
    """`read_checkpoint` without reading: safetensors tensors as header entries, torch files
    mapped (torch.load(mmap=True)); unreadable files and non-tensor entries fail here."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    target = _weights_in_folder(source) if source.is_dir() else source
    if isinstance(target, list):
        raw = {}
        for shard in target:
            raw.update(safetensors_entries(shard))
        return _checkpoint(source, raw, target, "wan")
    name = target.name
    if name.endswith(".safetensors.index.json"):
        raw, files = _read_index(target)
        layout = "wan"
    elif name.endswith(".safetensors"):
        raw, files, layout = safetensors_entries(target), [target], "wan"
    elif name.endswith(TORCH_SUFFIXES):
        raw, layout = _select_generator(read_torch(target), target, ema)
        files = [target]
    else:
        raise CheckpointError(
            f"{target}: unknown checkpoint format (expected a folder, .safetensors, "
            f".safetensors.index.json or one of {TORCH_SUFFIXES})"
        )
    return _checkpoint(source, raw, files, layout)


def _checkpoint(source: Path, raw: dict, files: list[Path], layout: str) -> Checkpoint:
    non_tensors = [k for k, v in raw.items() if not isinstance(v, (torch.Tensor, Entry))]
    if non_tensors:
        raise CheckpointError(f"{files[0]}: entries that are not tensors: {non_tensors[:MAX_LISTED_KEYS]}")
    state = normalize_keys(raw)
    file_keys = normalize_keys({key: key for key in raw})  # the same renames, applied to the names
    if layout == "wan" and is_diffusers_layout(raw):
        layout = "diffusers"
    return Checkpoint(source=source, layout=layout, files=files, state=state, file_keys=file_keys)


# -- loading into the model ---------------------------------------------------------------------


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def check_fit(model: torch.nn.Module, ckpt: Checkpoint, *, values: bool = True) -> None:
    """The pass every transformer checkpoint goes through before it is assigned: exactly the
    model's keys and shapes, floating-point dtypes, finite values. Raises CheckpointError.
    `values=False`: all but the values, which `stream_into` checks as it reads them."""
    _check_keys_and_shapes(model, ckpt)
    found = first_problem(ckpt.state, file_keys=ckpt.file_keys, values=values)
    if found is not None:
        key, problem = found
        raise CheckpointError(f"{ckpt.file_of(key)}: {problem}")


def _check_keys_and_shapes(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ckpt.state))
    unexpected = sorted(set(ckpt.state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(ckpt.state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(ckpt.state)
        if tuple(ckpt.state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listed(mismatched)}")
    if problems:
        files = ", ".join(str(f) for f in ckpt.files)
        hint = _size_hint(ckpt.state, model.state_dict())
        raise CheckpointError(
            f"{ckpt.source} [{ckpt.layout}; {files}] does not fit the model: " + "; ".join(problems) + hint
        )


def _size_hint(state: dict[str, Stored], expected: dict[str, torch.Tensor]) -> str:
    """'the checkpoint looks like dim 5120, 40 layers; the preset has dim 1536, 30 layers'."""

    def size(weights) -> tuple[int, int] | None:
        if "patch_embedding.weight" not in weights:
            return None
        layers = {int(m.group(1)) for k in weights if (m := _BLOCK_KEY.match(k))}
        return weights["patch_embedding.weight"].shape[0], len(layers)

    found, wanted = size(state), size(expected)
    if found is None or wanted is None or found == wanted:
        return ""
    return (
        f". The checkpoint looks like dim {found[0]}, {found[1]} layers; "
        f"the preset has dim {wanted[0]}, {wanted[1]} layers"
    )


def load_weights(
    model: torch.nn.Module,
    path: str | Path,
    *,
    ema: bool | None = None,
    device: torch.device | str = "cpu",
    dtypes: str = "file",
    edit: Edit | None = None,
) -> Checkpoint:
    """Open `path`, check it fits `model` (keys, shapes, dtypes) before reading any value, then
    load it tensor by tensor onto `device` (`streaming.stream_into`: values checked as they are
    read; `dtypes` "file" keeps the stored dtypes, "model" takes the meta model's; `edit` merges
    LoRA). Meant for a meta model; returns the opened checkpoint."""
    return load_opened(model, open_checkpoint(path, ema=ema), device=device, dtypes=dtypes, edit=edit)


def load_opened(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    *,
    device: torch.device | str = "cpu",
    dtypes: str = "file",
    edit: Edit | None = None,
) -> Checkpoint:
    """`ckpt` (opened, any family) checked to fit `model` without reading values, then streamed in."""
    check_fit(model, ckpt, values=False)
    where, keys = ckpt.file_of, ckpt.file_keys
    stream_into(model, ckpt.state, where=where, device=device, dtypes=dtypes, file_keys=keys, edit=edit)
    return ckpt
