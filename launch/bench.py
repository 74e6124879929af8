"""Benchmarks: each prints a table and writes JSON (default out/bench-<name>.json).

python -m launch.bench selective            # selective computation vs whole window
python -m launch.bench adherence            # the demo model's prompt adherence, sequential and pyramid
python -m launch.bench adherence --horizons 0-8 50-60 300-320   # ... and how it holds up on long streams
python -m launch.bench soak --minutes 10     # one stream: resident memory and FPS over time
python -m launch.bench cascade              # cascade fidelity vs sequential (offsets, joint/lagged)
python -m launch.bench switch               # prompt-switch latency: cascade vs sequential + recache
python -m launch.bench cascade-model --measure   # throughput model; 1 vs 2 ranks measured here
python -m launch.bench cache                # feature caching policies: speedup and fidelity
python -m launch.bench steps                # few-step models run with fewer steps: fidelity and speed
python -m launch.bench speed --preset self-forcing-1.3b --device cuda --random-weights   # one-device speed
python -m launch.bench ranks                # this CPU: 1 process vs cascade vs sp, ranks pinned to cores
python -m launch.bench kv                   # KV cache: memory of bf16 vs fp8 storage, fp8's fidelity
python -m launch.bench load                 # checkpoint loading: host memory and time, whole vs tensor by tensor
python -m launch.bench serve --quick       # many sessions under Poisson load: engine vs round-robin vs fifo
python -m launch.bench serve --layouts 1x5 5x1 --offered 3   # the real server as rank groups (K x G ranks)
python -m launch.bench layouts             # sessions layouts on 4 and 5 GPUs, modelled (1.3B, 14B)
python -m launch.bench gpu-report --quick   # GPU: environment + one short variant; without --quick, the whole report
python -m launch.bench coalesce            # k streams' forwards in one call vs k calls (demo, mid-wan)
python -m launch.bench compile             # --compile: compiled vs eager ms per tick, compile time (demo, mid-wan)
python -m launch.bench startup             # seconds to --help, to a refused flag, to the demo's first frame
python -m launch.bench transport --clip original.mp4   # JPEG/WebSocket vs WebRTC: bytes, PSNR, encode, latency
python -m launch.bench v2v                 # video-to-video vs text-to-video: time to first frame, FPS
python -m launch.bench text-encoder        # umT5-XXL encode on this CPU (--text-encoder-device cpu), 1 and all threads
python -m launch.bench weights             # fp8 weights: fidelity on the demo (PSNR), bytes of the presets' blocks
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from engine.argparsing import OneLineParser

BENCHMARKS = {
    "selective": "selective",
    "adherence": "adherence",
    "cascade": "cascade",
    "switch": "switch",
    "cascade-model": "cascade_model",
    "cache": "cache",
    "speed": "speed",
    "steps": "steps",
    "ranks": "ranks",
    "soak": "soak",
    "kv": "kv",
    "load": "load",
    "layouts": "layouts",
    "serve": "serve",
    "gpu-report": "gpu_report",
    "coalesce": "coalesce",
    "compile": "compile",
    "startup": "startup",
    "transport": "transport",
    "v2v": "video_in",
    "text-encoder": "text_encoder",
    "weights": "weights",
}
"""Subcommand -> module of launch/benchmarks/, imported only when its subcommand runs (or for
--help): some import torch's compiler or the server, seconds that other benchmarks do not need."""


def benchmark(name: str):
    return importlib.import_module(f"launch.benchmarks.{BENCHMARKS[name]}")


class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's docstring as written, and every flag's default."""


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="name", required=True)
    chosen = argv if argv is not None else sys.argv[1:]
    names = [chosen[0]] if chosen and chosen[0] in BENCHMARKS else list(BENCHMARKS)
    for name in names:
        module = benchmark(name)
        summary = module.__doc__.split("\n")[0]
        child = sub.add_parser(name, help=summary, description=module.__doc__,
                               formatter_class=HelpFormat)  # fmt: skip
        module.add_arguments(child)
        child.add_argument("--json", type=Path, default=Path(f"out/bench-{name}.json"), help="where to write results")
    args = parser.parse_args(argv)
    import torch

    from launch.cli import USER_ERRORS
    from launch.report import table, write_json

    torch.set_grad_enabled(False)
    try:
        rows, columns, settings = benchmark(args.name).run(args)
    except USER_ERRORS as err:  # a typo in --preset or --device is one line, as in generate/stream
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rows, columns))
    write_json(args.json, args.name, rows, settings)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
