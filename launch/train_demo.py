"""Train the demo model and write its weights (default folder out/demo-train; never the shipped ones).

The shipped v3 weights, in two stages (engine/weights/demo/README.md says why):
python -m launch.train_demo --shape-weight 0 --grid 1 0.75 0.5 0.25 --out out/demo-stage1
python -m launch.train_demo --init out/demo-stage1 --steps 1800 --lr 5e-4 --warmup 50 --grid-share 0.75 --seed 1 \
    --out out/demo-stage2

Training on the model's own rollouts, from the shipped weights (resumable: run it again with --resume):
python -m launch.train_demo --init engine/weights/demo --rollout-streams 8 --batch 8 --lr 3e-4 --warmup 20 \
    --out out/demo-train

The shipped weights' last stage, distilling a 16-step sampler near the shape (the model card says why; OUT
folders of earlier stages as --init):
python -m launch.train_demo --init out/demo-stage3 --rollout-streams 8 --batch 8 --lr 2e-4 --warmup 20 --ema 0.995 \
    --steps 1200 --stop-at 452 --threads 1 --no-bf16 --seed 6 --teacher-timesteps 1000 900 800 700 600 500 400 300 \
    250 200 150 100 70 40 20 10 --teacher-share 1 --teacher-region shape --out out/demo-stage7

Every --checkpoint-minutes the whole training state goes to OUT/checkpoint.pt and the EMA weights
to OUT/step-NNNNN/ (a folder `launch.bench adherence --weights` takes). --resume goes on from
OUT/checkpoint.pt exactly (same weights, optimizer, EMA, random states and rollout streams).
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

from engine.argparsing import OneLineParser
from engine.demo.trainer import Trainer
from engine.demo.training import TrainConfig
from engine.devices import resolve_device
from engine.weight_paths import BUNDLED_FILES
from launch.presets import get_preset

CHECKPOINT = "checkpoint.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m launch.train_demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag, kind, text = f"--{f.name.replace('_', '-')}", type(f.default), f.metadata["help"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif kind is tuple:
            parser.add_argument(flag, type=float, nargs="+", default=f.default, help=text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=text, choices=f.metadata["choices"])
    parser.add_argument("--out", type=Path, default=Path("out/demo-train"), help="folder for weights and checkpoints")
    parser.add_argument("--init", type=Path, default=None, help="start from the weights and codec in this folder")
    parser.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt if it exists")
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=10.0, help="minutes between checkpoints (0: only at the end)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    parser.add_argument(
        "--stop-at", type=int, default=0, help="stop after this step and write its weights; the learning rate still "
        "follows the --steps schedule (0: run all --steps)"
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def save_weights(out: Path, trainer: Trainer, note: dict) -> None:
    """The EMA weights as a folder laid out like the shipped ones, with training.json."""
    out.mkdir(parents=True, exist_ok=True)
    with trainer.ema.swapped():
        state = {k: v.detach().float().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / BUNDLED_FILES["transformer"]))
        trainer.words.save(out / BUNDLED_FILES["text_encoder"])
    trainer.codec.save(out / BUNDLED_FILES["vae"])
    losses = trainer.losses["total"]
    record = {
        "config": asdict(trainer.cfg),
        **note,
        "step": trainer.step,
        "device": str(trainer.device),
        "torch": torch.__version__,
        "seconds": round(trainer.seconds, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 5) if losses else None,
        "loss_every_100_steps": {name: [round(float(np.mean(v[i : i + 100])), 5) for i in range(0, len(v), 100)]
                                 for name, v in trainer.losses.items() if v},
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=2))


def checkpoint(args, trainer: Trainer, note: dict) -> None:
    trainer.save(args.out / CHECKPOINT)
    save_weights(args.out / f"step-{trainer.step:05d}", trainer, note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}  # nargs gave lists
    try:
        cfg = TrainConfig(**values)
        if args.stop_at < 0:
            raise ValueError("--stop-at is a step: give 0 (run all --steps) or a positive step")
    except ValueError as error:
        print(f"error: {error} (see python -m launch.train_demo --help)", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    trainer = Trainer(get_preset("demo"), cfg, device, args.init)
    note = {"init": None if args.init is None else args.init.as_posix(),
            "command": "python -m launch.train_demo " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    if args.resume and (args.out / CHECKPOINT).exists():
        trainer.load(args.out / CHECKPOINT)
        print(f"resumed at step {trainer.step} from {args.out / CHECKPOINT}", flush=True)
    last_save = time.monotonic()
    end = min(args.stop_at, cfg.steps) if args.stop_at > 0 else cfg.steps
    while trainer.step < end:
        values = trainer.train_step()
        if trainer.step % args.log_every == 0:
            means = {k: float(np.mean(v[-args.log_every :])) for k, v in trainer.losses.items() if v}
            text = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            print(f"step {trainer.step}/{cfg.steps}  {text}  {trainer.seconds / trainer.step:.2f} s/step  "
                  f"{trainer.seconds / 60:.1f} min", flush=True)  # fmt: skip
        if args.checkpoint_minutes and time.monotonic() - last_save > 60 * args.checkpoint_minutes:
            checkpoint(args, trainer, note)
            last_save = time.monotonic()
            print(f"checkpoint at step {trainer.step}", flush=True)
    trainer.save(args.out / CHECKPOINT)
    save_weights(args.out, trainer, note)
    print(f"trained {trainer.step} of {cfg.steps} steps in {trainer.seconds / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
