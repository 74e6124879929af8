"""Read MAGI-1 transformer weights in the released layout and load them into `MagiModel`.

Layout (MAGI-1 `inference/infra/checkpoint`, HF `sand-ai/MAGI-1` `ckpt/magi/<size>_<kind>/`):
* a variant folder `inference_weight[.fp8][.distill]/` holding `model.safetensors.index.json`
  (HF style: `{"metadata": {"total_size": N}, "weight_map": {key: shard}}`) and shards
  `model-0000i-of-0000N.safetensors`, or a single `model.safetensors`;
* a shard may be stored zstd-compressed as `<shard>.zst`; it is decompressed in memory (the
  `zstandard` module, else the `zstd` CLI), nothing is written next to the weights;
* keys are the `VideoDiTModel` module names, which are ours (engine/models/magi.py); a leading
  `module.` (DDP) is stripped.

FP8 variants (`inference_weight.fp8*`) quantise the q, qx, k, v, linear_fc1 (per-tensor) and
linear_proj, linear_fc2 (per-channel, with a per-input-channel `smooth_scale`) Linears of layers
1..L-2. We do not use fp8 kernels: each such weight is dequantised to a dense weight, in the dtype
the unquantised layers are stored in (bf16 in the release), so an fp8 checkpoint loads into the
same dense model as a bf16 one and `MagiModel.cast` treats both alike:
  per-tensor   W = weight[0] * weight_scale
  per-channel  W = weight[0] * weight_scale / smooth_scale[0][None, :]
(the per-channel layer divides its input by smooth_scale before the matmul, so folding 1/smooth
into W's input columns is exact). `input_scale` only quantises activations and is dropped. The
result carries the fp8 rounding of the weights, not of the activations.

Anything that does not fit the model exactly raises `CheckpointError` naming the file and keys;
`check_fit` also refuses dtypes that are not floating point (fp8 left without its scales included)
and NaN/inf values, after dequantisation, so a bad scale is caught too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from engine.models.checkpoints.streaming import Edit, Entry, Stored, safetensors_entries, value_of
from engine.models.checkpoints.validate import FP8_DTYPES
from engine.models.checkpoints.wan import (
    Checkpoint,
    CheckpointError,
    _read_index,
    first_line,
    load_opened,
    read_safetensors,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
VARIANT_PREFIX = "inference_weight"
PER_TENSOR = ("q", "qx", "k", "v", "linear_fc1")
PER_CHANNEL = ("linear_proj", "linear_fc2")
FP8_MAX = 448.0  # largest float8_e4m3fn value
DENSE_DTYPE = torch.bfloat16  # what the release stores unquantised block weights in

_LAYER = re.compile(r"^videodit_blocks\.layers\.(\d+)\.(.*)$")


# -- finding the weights ------------------------------------------------------------------------


def _variant_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(VARIANT_PREFIX))


def _variant_name(variant: str) -> str:
    """`distill`, `fp8.distill` or the folder name `inference_weight.fp8.distill`."""
    return variant if variant.startswith(VARIANT_PREFIX) else f"{VARIANT_PREFIX}.{variant}"


def _weights_folder(folder: Path, variant: str | None) -> Path:
    """The variant folder: `folder` itself, its `variant`, or its only `inference_weight*` folder."""
    if variant is not None:
        chosen = folder / _variant_name(variant)
        if not chosen.is_dir():
            found = [p.name for p in _variant_folders(folder)]
            raise CheckpointError(f"{folder}: no variant folder {chosen.name} (found: {found or 'none'})")
        return chosen
    if (folder / INDEX).is_file() or any(folder.glob(SINGLE + "*")):
        return folder
    candidates = _variant_folders(folder)
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise CheckpointError(f"{folder}: several MAGI-1 variants ({names}); choose one with variant=NAME")
    raise CheckpointError(f"{folder}: no {INDEX}, {SINGLE} or {VARIANT_PREFIX}* folder")


def _weights_file(path: Path, variant: str | None) -> Path:
    """The index or the single file to read (the index wins, as in the reference loader)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if variant is not None:
            raise CheckpointError(f"{path}: variant={variant!r} needs the folder holding the variants")
        return path
    folder = _weights_folder(path, variant)
    return folder / INDEX if (folder / INDEX).is_file() else folder / SINGLE


# -- reading files --------------------------------------------------------------------------------


def _decompress(packed: Path) -> bytes:
    """A `.zst` shard's bytes: the zstandard module if installed, else the zstd CLI."""
    try:
        import zstandard
    except ImportError:
        return _decompress_cli(packed)
    try:
        with packed.open("rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    except (OSError, zstandard.ZstdError) as err:
        raise CheckpointError(f"{packed}: cannot decompress ({err})") from err


def _decompress_cli(packed: Path) -> bytes:
    if shutil.which("zstd") is None:
        raise CheckpointError(
            f"{packed}: compressed shard, but neither the `zstandard` module nor the `zstd` CLI is "
            f"available; decompress it with `zstd -d {packed}` (or `pip install zstandard`)"
        )
    done = subprocess.run(["zstd", "-d", "-c", "-q", str(packed)], capture_output=True)
    if done.returncode != 0:
        raise CheckpointError(f"{packed}: zstd -d failed ({done.stderr.decode(errors='replace').strip()})")
    return done.stdout


def _stored(path: Path) -> Path:
    """The file that holds shard `path`: itself, or `path.zst` when only that exists."""
    packed = path.with_name(path.name + ".zst")
    return packed if packed.is_file() and not path.is_file() else path


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Shard `path` (.safetensors), decompressed from `path.zst` when only that exists."""
    packed = _stored(path)
    if packed == path:
        return read_safetensors(path)
    try:
        return load_bytes(_decompress(packed))
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own errors for a corrupt payload
        raise CheckpointError(f"{packed}: cannot read safetensors payload ({first_line(err)})") from err


class _OneShard:
    """The tensors of the compressed shard read last. Entries are read shard after shard, so each
    .zst shard is decompressed once more (once for its headers at opening) and one is held at a time."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, path: Path, key: str) -> torch.Tensor:
        if path != self.path:
            self.tensors = {}  # the previous shard goes before the next is decompressed
            self.tensors, self.path = read_shard(path), path
        return self.tensors[key]


def shard_entries(path: Path, shards: _OneShard) -> dict[str, Entry]:
    """Shard `path` opened: its header entries, from `path.zst` when only that exists."""
    packed = _stored(path)
    if packed == path:
        return safetensors_entries(path)
    headers = {key: (t.shape, t.dtype) for key, t in read_shard(path).items()}  # corrupt payloads fail here
    return {key: Entry(shape, dtype, packed, partial(shards.get, path, key)) for key, (shape, dtype) in headers.items()}


def _open_shards(index: Path) -> tuple[dict[str, Stored], list[Path]]:
    """All shards of `index`, each plain or as `.zst` (the shared index reader, with our access)."""
    return _read_index(index, partial(shard_entries, shards=_OneShard()), _stored)


# -- fp8 ------------------------------------------------------------------------------------------


def _dense_dtype(state: dict[str, Stored], key: str) -> torch.dtype:
    """The dtype of the same weight in layer 0, which is never quantised (bf16 if absent)."""
    match = _LAYER.match(key)
    twin = state.get(f"videodit_blocks.layers.0.{match.group(2)}") if match else None
    if twin is None or twin.dtype.itemsize == 1:
        return DENSE_DTYPE
    return twin.dtype


def _fp8_parts(state: dict[str, Stored], base: str, source: Path) -> tuple[Stored, Stored, Stored | None]:
    """(weight, weight_scale, smooth_scale or None) of the fp8 Linear `base` (e.g.
    `...mlp.linear_fc2.`), checked from their headers."""
    weight = state.get(base + "weight")  # [1, out, in] float8_e4m3fn
    scale = state[base + "weight_scale"]  # [1]
    smooth = state.get(base + "smooth_scale")  # [1, in], per-channel layers only
    if weight is None or weight.dim() != 3 or weight.shape[0] != 1 or scale.numel() != 1:
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{source}: {base}weight {shape} is not an fp8 weight [1, out, in] with one scale")
    if weight.dtype not in FP8_DTYPES:  # the only place fp8 is allowed, and only fp8
        raise CheckpointError(
            f"{source}: {base}weight is {str(weight.dtype).removeprefix('torch.')} beside a weight_scale; "
            "MAGI-1's fp8 release stores float8_e4m3fn there: use that release or the bf16 one"
        )
    if smooth is not None and tuple(smooth.shape) != (1, weight.shape[2]):
        raise CheckpointError(f"{source}: {base}smooth_scale {tuple(smooth.shape)} should be [1, {weight.shape[2]}]")
    return weight, scale, smooth


def _dense(weight: Stored, scale: Stored, smooth: Stored | None, dtype: torch.dtype) -> torch.Tensor:
    """The dense `[out, in]` weight: weight[0] * scale (/ smooth[0] per input channel)."""
    dense = value_of(weight)[0].float() * value_of(scale).float()
    if smooth is not None:
        dense = dense / value_of(smooth)[0].float()[None, :]
    return dense.to(dtype)


def dequantize_fp8(state: dict[str, Stored], source: Path) -> dict[str, Stored]:
    """Replace every fp8 Linear (a `.weight_scale` key) by an entry that reads its dense weight, and
    drop its scales. Stray scales without a `.weight_scale` stay, so `check_fit` reports them."""
    out = dict(state)
    for base in [k[: -len("weight_scale")] for k in state if k.endswith(".weight_scale")]:
        weight, scale, smooth = _fp8_parts(state, base, source)
        dtype = _dense_dtype(state, base + "weight")
        file = weight.file if isinstance(weight, Entry) else source
        read = partial(_dense, weight, scale, smooth, dtype)
        out[base + "weight"] = Entry(torch.Size(weight.shape[1:]), dtype, file, read)
        for scale in ("weight_scale", "input_scale", "smooth_scale"):
            out.pop(base + scale, None)
    return out


# -- the public API -------------------------------------------------------------------------------


def read_magi_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Read MAGI-1 weights: a variant folder, a folder holding `inference_weight*` folders
    (`variant` picks one: "distill", "fp8.distill" or the full folder name), the index, or a
    single `model.safetensors`. FP8 weights come back dense (layout "magi-fp8")."""
    return open_magi_checkpoint(path, variant).read_all()


def open_magi_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """`read_magi_checkpoint` without reading the values (header entries; fp8 checked, dense
    weights computed as they are read)."""
    source = Path(path)
    target = _weights_file(source, variant)
    if target.name.endswith(".safetensors.index.json"):
        raw, files = _open_shards(target)
    elif target.name.endswith(".safetensors") or target.name.endswith(".safetensors.zst"):
        plain = target.with_name(target.name.removesuffix(".zst"))
        raw, files = shard_entries(plain, _OneShard()), [_stored(plain)]
    else:
        raise CheckpointError(f"{target}: expected a folder, {INDEX} or a .safetensors file")
    file_keys = {key.removeprefix("module."): key for key in raw}
    state = {ours: raw[key] for ours, key in file_keys.items()}
    quantized = any(key.endswith(".weight_scale") for key in state)
    if quantized:
        state = dequantize_fp8(state, target)
    layout = "magi-fp8" if quantized else "magi"
    return Checkpoint(source=source, layout=layout, files=files, state=state, file_keys=file_keys)


def load_magi_weights(
    model: torch.nn.Module,
    path: str | Path,
    variant: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtypes: str = "file",
    edit: Edit | None = None,
) -> Checkpoint:
    """Open `path`, check it fits `model` before reading values, and load it tensor by tensor
    (as `wan.load_weights`: `device`, `dtypes` "file" or "model", `edit`). Meant for a meta model."""
    return load_opened(model, open_magi_checkpoint(path, variant), device=device, dtypes=dtypes, edit=edit)


# -- writing (tests, conversions) -----------------------------------------------------------------


def _quantize(weight: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    """fp8 tensors of a dense `[out, in]` weight, as the release stores them (suffix -> tensor)."""
    weight = weight.detach().float()
    out: dict[str, torch.Tensor] = {}
    if per_channel:
        # a SmoothQuant-style per-input-channel factor; W = W' / smooth, so store W' = W * smooth
        smooth = weight.abs().amax(0).clamp_min(1e-8).sqrt()  # [in]
        weight = weight * smooth[None, :]
        out["smooth_scale"] = smooth[None, :]  # [1, in]
        out["input_scale"] = torch.ones(1)  # activation scales are calibration data; the loader drops them
    else:
        out["input_scale"] = torch.ones(weight.shape[1])  # [in]
    scale = weight.abs().amax().clamp_min(1e-12) / FP8_MAX
    out["weight"] = (weight / scale).clamp(-FP8_MAX, FP8_MAX)[None].to(torch.float8_e4m3fn)  # [1, out, in]
    out["weight_scale"] = scale.reshape(1)
    return out


def _fp8_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantise the fp8 Linears of layers 1..L-2, as `fp8_quant` does."""
    layers = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    out = {}
    for key, value in state.items():
        match = _LAYER.match(key)
        name = key.split(".")[-2] if key.endswith(".weight") else None
        if match and 0 < int(match.group(1)) < layers - 1 and name in PER_TENSOR + PER_CHANNEL:
            base = key[: -len("weight")]
            out.update({base + suffix: t for suffix, t in _quantize(value, name in PER_CHANNEL).items()})
        else:
            out[key] = value
    return out


def save_magi_checkpoint(
    state_dict: dict[str, torch.Tensor], folder: str | Path, shards: int = 2, fp8: bool = False
) -> Path:
    """Write `state_dict` in the released layout: `folder/model.safetensors.index.json` + shards
    `model-0000i-of-0000N.safetensors` (keys split in order). `fp8`: quantise as the fp8 release."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if fp8:
        state = _fp8_state(state)
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return folder
