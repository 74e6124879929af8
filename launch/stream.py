"""Serve one endless stream to viewers: `python -m engine.stream`, or under torchrun.

    python -m engine.stream                                   # the demo model, http://127.0.0.1:8000
    torchrun --nproc_per_node=3 -m engine.stream --schedule cascade --offset 1 --port 8000
    python -m engine.stream --host 0.0.0.0 --token SECRET     # reachable from elsewhere: token needed

The serving rank (the decode rank, or rank 0) runs the web server; the other ranks only compute.
Ctrl-C or SIGTERM stops every rank at the next tick and closes the recording.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch

from engine.argparsing import OneLineParser
from engine.config import Preset
from engine.demo.vocab import ignored_words
from engine.loading import resolve_dtype
from engine.serving import flags
from engine.serving.live import Controls, LiveStream
from engine.serving.server import StreamServer, needs_token
from engine.serving.video import Mp4Writer
from launch.cli import (
    add_parallel_arguments,
    add_plan_arguments,
    add_preset_arguments,
    add_speed_arguments,
    add_weight_arguments,
    preset_from_args,
    rank_device,
    single_process_notes,
    speed_from_args,
    weights_from_args,
)
from launch.run import RankRun, on_ranks
from parallel.topology import Topology

log = logging.getLogger("launch.stream")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m engine.stream", description=__doc__.split("\n\n")[0])
    add_preset_arguments(parser)
    parser.add_argument("--prompt", type=flags.prompt, default="a red circle moving left",
                        help="the prompt the stream starts with (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="fixes the stream's noise (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=flags.port, default=8000, help="0: any free one (default: %(default)s)")
    parser.add_argument("--token", help="required from viewers; needed off loopback (default: none)")
    parser.add_argument("--allow-origin", type=flags.origin, action="append", default=[], metavar="ORIGIN",
                        help="also accept viewers' WebSockets from pages of this origin, e.g. https://stream.example "
                        "(repeatable; * for any; default: only the server's own page)")  # fmt: skip
    parser.add_argument("--record", type=Path, help="also write the stream to this MP4 (default: none)")
    parser.add_argument("--no-pace", dest="pace", action="store_false", help="unpaced (default: paced to the fps)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded (default: off)")
    add_weight_arguments(parser)
    add_plan_arguments(parser)
    add_parallel_arguments(parser)
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    if needs_token(args.host) and not args.token:
        parser.error(f"--host {args.host} makes the stream reachable from other machines: pass --token")
    return args


def _source(args: argparse.Namespace, preset: Preset, topology: Topology):
    """(block source, decoder, cache hit rate) for this rank: the plan on compute ranks, receiving
    on a decode rank."""
    device = rank_device(args, topology)
    dtype = resolve_dtype(args.dtype, device)
    rank = RankRun(preset, weights_from_args(args), device, dtype, topology, speed=speed_from_args(args))
    source = lambda prompt_for: rank.blocks(prompt_for, blocks=None, seed=args.seed)  # noqa: E731

    def cache_hits() -> float | None:
        """The share of this rank's block-steps a feature cache skipped so far (None without one)."""
        stats = rank.stats()
        return None if stats is None or stats.hit_rate is None else round(stats.hit_rate, 3)

    return source, rank.decoder, cache_hits


def _stop_on_signals(controls: Controls, serving: bool) -> None:
    """The serving rank stops the stream at the next tick; the others follow it there."""
    if not serving:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # wait for the serving rank's stop
        return

    def stop(signum, frame):
        controls.stop()
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def serve(args: argparse.Namespace, topology: Topology) -> None:
    preset = preset_from_args(args)
    for note in single_process_notes(args, topology):
        print(f"note: {note}", file=sys.stderr)
    controls = Controls(args.prompt)
    serving = topology.is_decoder
    stream, recorder, server = None, None, None
    try:
        if serving:  # listen before any weights load: a port in use is said at once
            text = preset.text  # a vocabulary model's ack lists the words it will ignore
            ignored = (lambda p: ignored_words(p, text.vocab, text.text_len)) if text.vocab else (lambda p: [])
            server = StreamServer(controls, host=args.host, port=args.port, token=args.token,
                                  allow_origins=tuple(args.allow_origin), ignored_words=ignored).start()  # fmt: skip
        source, decoder, cache_hits = _source(args, preset, topology)
        stream = LiveStream(source, decoder, controls, topology, steps=preset.sampling.steps, fps=preset.stream.fps,
                            pace=args.pace, on_frames=lambda *a: None, cache_hits=cache_hits)  # fmt: skip
        if serving:
            server.stats = stream.snapshot
            recorder = args.record and Mp4Writer(args.record, fps=preset.stream.fps, width=preset.stream.width,
                                                 height=preset.stream.height)  # fmt: skip
            stream.on_frames = _fan_out(server, recorder)
            print(f"serving {server.url}", flush=True)
        _stop_on_signals(controls, serving)
        stream.run()
    finally:
        if server is not None:
            server.stop()
        if recorder:
            recorder.close()


def _fan_out(server: StreamServer, recorder: Mp4Writer | None):
    def on_frames(frames, first_index, version, seconds):
        server.hub.publish(frames, first_index, version, seconds)
        if recorder:
            recorder.write(frames)

    return on_frames


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return on_ranks(args, lambda topology: serve(args, topology))[0]


def entry() -> int:
    """The `-m` entry point: no autograd anywhere in a run."""
    torch.set_grad_enabled(False)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
