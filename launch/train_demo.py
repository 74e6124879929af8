"""Train the demo model (1-2 hours on 2 CPU cores; minutes on a GPU) and write its weights.

The shipped weights, in two stages (engine/weights/demo/README.md says why):
python -m launch.train_demo --shape-weight 0 --grid 1 0.75 0.5 0.25 --out out/demo-stage1
python -m launch.train_demo --init out/demo-stage1 --steps 1800 --lr 5e-4 --warmup 50 --grid-share 0.75 --seed 1

python -m launch.train_demo --steps 200 --out out/demo-quick     # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.demo.pixels import PatchCodec
from engine.demo.training import (
    EMA,
    TrainConfig,
    block_sigmas,
    context_first,
    diffusion_forcing_loss,
    fit_codec,
    learning_rate,
    make_batch,
)
from engine.demo.vocab import VocabEncoder
from engine.loading import BUNDLED_FILES, bundled_weights_dir, init_random_, resolve_device
from engine.models.checkpoints.wan import load_weights
from engine.models.rope import Rope
from engine.models.wan import WanModel
from engine.plan.sigmas import build_schedule
from launch.presets import get_preset

LOG_EVERY = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train_demo", description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default
            )
        elif kind is tuple:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, nargs="+", default=f.default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    parser.add_argument("--out", type=Path, default=bundled_weights_dir("demo"), help="folder for the weights")
    parser.add_argument(
        "--init", type=Path, default=None, help="start from the weights (and latent space) in this folder"
    )
    parser.add_argument("--save-every", type=int, default=0, help="also write the EMA weights every N steps")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def build(preset, cfg: TrainConfig, device: torch.device, init: Path | None) -> tuple[WanModel, VocabEncoder]:
    """Fresh weights (the head starts at zero flow everywhere), or those saved in `init`."""
    torch.manual_seed(cfg.seed)
    model = WanModel(preset.model)
    if init is None:
        init_random_(model, cfg.seed)
        with torch.no_grad():
            model.head.head.weight.zero_()
            model.head.head.bias.zero_()
        words = VocabEncoder.create(preset.text.vocab, preset.text.text_len, preset.model.text_dim)
    else:
        load_weights(model, init / BUNDLED_FILES["transformer"])
        words = VocabEncoder.load(init / BUNDLED_FILES["text_encoder"], preset.text.vocab, preset.text.text_len)
    return model.to(device).train(), VocabEncoder(words.vocab, words.text_len, words.module.to(device).train(), device)


def train(
    preset, cfg: TrainConfig, device: torch.device, init: Path | None = None, checkpoint=None, every: int = 0
) -> tuple[WanModel, VocabEncoder, PatchCodec, dict]:
    """`init`: go on from the weights in that folder, keeping its latent space. Every `every`
    steps, `checkpoint(model, words, codec, stats)` sees the EMA weights so far."""
    codec = fit_codec(preset, cfg) if init is None else PatchCodec.load(init / BUNDLED_FILES["vae"], preset.vae.patch)
    model, words = build(preset, cfg, device, init)
    params = list(model.parameters()) + list(words.module.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA([model, words.module], cfg.ema)
    rope = Rope(preset.model, (preset.latent_hw[0] // 2, preset.latent_hw[1] // 2), device)
    rng, generator = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    block = preset.stream.frames_per_block
    grid = cfg.grid or build_schedule(preset.sampling).sigmas[:-1]  # by default the levels sampling visits
    losses, start = [], time.perf_counter()
    progress = tqdm(range(cfg.steps), unit="step", disable=None, file=sys.stderr)
    for step in progress:
        batch = make_batch(preset, cfg, codec, rng)
        sigma = block_sigmas(cfg.batch, cfg.clip_blocks, block, cfg.clean_share, generator, grid, cfg.grid_share)
        sigma = context_first(sigma, batch.mid_stream, block)
        noise = torch.randn(batch.latents.shape, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = diffusion_forcing_loss(
                model, words, rope, batch.to(device), sigma.to(device), noise.to(device), block
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            with ema.swapped():
                checkpoint(model, words, codec, _stats(losses, start))
        if progress.disable and (step + 1) % LOG_EVERY == 0:  # no terminal: plain progress lines
            minutes = (time.perf_counter() - start) / 60
            print(
                f"step {step + 1}/{cfg.steps}  loss {np.mean(losses[-LOG_EVERY:]):.4f}  {minutes:.1f} min", flush=True
            )
    ema.copy_to()
    return model.eval(), words, codec, _stats(losses, start)


def _stats(losses: list[float], start: float) -> dict:
    return {"seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-100:])), "losses": losses}


def save(
    out: Path, model: WanModel, words: VocabEncoder, codec: PatchCodec, cfg: TrainConfig, stats: dict, device
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / BUNDLED_FILES["transformer"]))
    words.save(out / BUNDLED_FILES["text_encoder"])
    codec.save(out / BUNDLED_FILES["vae"])
    record = {
        "config": asdict(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "init": stats.get("init"),
        "seconds": round(stats["seconds"], 1),
        "final_loss": round(stats["final_loss"], 5),
        "loss_every_100_steps": [round(float(np.mean(stats["losses"][i : i + 100])), 5)
                                 for i in range(0, len(stats["losses"]), 100)],
        "command": "python -m launch.train_demo " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = TrainConfig(**{**values, "grid": tuple(values["grid"])})
    device = resolve_device(args.device)
    preset = get_preset("demo")
    init = None if args.init is None else args.init.as_posix()

    def checkpoint(model, words, codec, stats):
        save(args.out, model, words, codec, cfg, {**stats, "init": init}, device)

    model, words, codec, stats = train(preset, cfg, device, args.init, checkpoint, args.save_every)
    checkpoint(model, words, codec, stats)
    print(f"trained {cfg.steps} steps in {stats['seconds'] / 60:.1f} min, final loss {stats['final_loss']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
