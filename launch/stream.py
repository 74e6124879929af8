"""Serve endless streams to viewers, each its own: `python -m engine.stream`, or under torchrun.

    python -m engine.stream                                   # the demo model, http://127.0.0.1:8000
    torchrun --nproc_per_node=5 -m engine.stream --schedule cascade --offset 1   # every session on a 5-rank cascade
    torchrun --nproc_per_node=4 -m engine.stream --replicas 2 --sp 2   # 2 groups, sp 2 in each
    torchrun --nproc_per_node=2 -m engine.stream --replicas 2 # sessions over 2 one-rank replicas
    python -m engine.stream --shared-stream                   # one stream for every viewer
    torchrun --nproc_per_node=3 -m engine.stream --shared-stream --schedule cascade --offset 1
    python -m engine.stream --host 0.0.0.0 --token SECRET     # reachable from elsewhere: token needed

Sessions (the default): every viewer gets a session of its own, or joins one by its id. The
ranks split into `--replicas` groups (default one group of every rank); each group is a cascade
x sp of ranks holding the model and serving its own sessions: its first rank schedules them and
steps the group (engine/serving/group.py). Rank 0 serves; new sessions go to the group with the
most room (engine/serving/replicas.py). Shared stream: the serving rank (the decode rank, or
rank 0) runs the web server; the other ranks only compute.
Ctrl-C or SIGTERM stops every session and rank (the shared stream: at the next tick, closing the
recording).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from engine.argparsing import OneLineParser
from engine.config import ConfigError, Preset
from engine.demo.vocab import ignored_words
from engine.devices import resolve_dtype
from engine.serving import flags
from engine.serving.group import Outbox, follow
from engine.serving.live import Controls, LiveStream, SessionDesk
from engine.serving.replicas import LocalReplica, RemoteReplica, ReplicaDown, serve_replica
from engine.serving.scheduler import Limits
from engine.serving.server import StreamServer, needs_token
from engine.serving.sessions import SessionManager
from engine.serving.video import Mp4Writer
from launch.build import build_session
from launch.cli import (
    add_preset_arguments,
    add_run_arguments,
    preset_from_args,
    process_from_args,
    rank_device,
    single_process_notes,
    speed_from_args,
    weights_from_args,
)
from launch.memory import MemoryPlan, plan_run
from launch.run import RankRun, on_ranks
from launch.threads import configure_threads
from parallel.faults import is_peer_trouble
from parallel.replicas import SERVING_RANK, group_cast, replica_links
from parallel.topology import Topology

log = logging.getLogger("launch.stream")


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--webrtc", action=argparse.BooleanOptionalAction, default=True,
                        help="offer viewers the video over WebRTC (VP8 or H.264; JPEG over the WebSocket where that "
                        "fails or aiortc is missing); --no-webrtc: JPEG only (default: on)")  # fmt: skip
    parser.add_argument("--ice-server", type=flags.ice_server, action="append", default=[], metavar="URL",
                        help="a STUN or TURN server for viewers beyond loopback and LAN: stun:HOST[:PORT] or "
                        "turn:USER:PASS@HOST[:PORT] (repeatable; default: none)")  # fmt: skip
    parser.add_argument("--record", type=Path, help="also write the shared stream to this MP4 (default: none)")
    parser.add_argument("--no-pace", dest="pace", action="store_false", default=None,
                        help="shared stream unpaced (default: paced to the fps)")  # fmt: skip
    add_session_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets loaded (default: off)")
    add_run_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if needs_token(args.host) and not args.token:
        parser.error(f"--host {args.host} makes the stream reachable from other machines: pass --token")
    return args


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sessions (the default: each viewer its own stream)")
    group.add_argument(
        "--shared-stream",
        action="store_true",
        help="one stream for every viewer, any of them steering it (default: a session per viewer)",
    )
    group.add_argument(
        "--session-memory",
        type=flags.mebibytes,
        metavar="MIB",
        help="KV memory for the running sessions on each rank, in MiB: a cascade's ranks each hold a session's whole "
        "KV cache, an sp group's ranks 1/sp of it (default: from the memory plan, the sessions that fit beside the "
        "model in --gpu-memory or the device's free memory, each with its KV cache, decoder cache and prompt K/V, "
        f"times the KV cache of one; {SESSION_MEMORY_MIB} where the free memory is unknown)",
    )
    group.add_argument(
        "--grace",
        type=flags.seconds,
        metavar="S",
        help=f"seconds a session without viewers keeps running before it is suspended; a viewer who "
        f"comes back with its id within {EXPIRE_S:g} s more resumes it (default: {Limits.grace_s:g})",
    )
    group.add_argument(
        "--session-batch",
        type=flags.count,
        metavar="N",
        help=f"sessions stepped per round, their forwards coalesced (default: {Limits.batch})",
    )
    group.add_argument(
        "--admit-at-floor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="admit as many sessions as the measured speed keeps at the quality floor's fidelity (fewer "
        "denoising steps or more feature caching, each session lowered only while capacity is short for "
        "it); --no-admit-at-floor: only as many as run at full fidelity (default: on; a preset without a "
        "measured fidelity ladder has full fidelity as its floor)",
    )


SESSION_FLAGS = {
    "session_memory": "--session-memory",
    "grace": "--grace",
    "session_batch": "--session-batch",
    "admit_at_floor": "--admit-at-floor",
}
SHARED_FLAGS = {"record": "--record", "pace": "--no-pace"}
SESSION_MEMORY_MIB = 1024
EXPIRE_S = Limits.expire_s


def session_limits(args: argparse.Namespace, memory: MemoryPlan | None = None) -> Limits:
    """The session manager's limits from the flags (refused with --shared-stream, which has none).
    The KV budget: --session-memory if given, else what the memory plan leaves for sessions."""
    given = {d: getattr(args, d) for d in SESSION_FLAGS if getattr(args, d) is not None}
    batch = given.get("session_batch", Limits.batch)
    budget = given["session_memory"] << 20 if "session_memory" in given else planned_kv_budget(memory, batch)
    return Limits(
        kv_budget_bytes=budget,
        grace_s=given.get("grace", Limits.grace_s),
        batch=batch,
        admit_at_floor=given.get("admit_at_floor", Limits.admit_at_floor),
    )


def planned_kv_budget(memory: MemoryPlan | None, batch: int) -> int:
    """The KV caches of the sessions the plan fits beside the model (`batch` of them in a forward):
    a smaller card admits fewer. Without a plan or a known budget: SESSION_MEMORY_MIB."""
    if memory is None or memory.budget is None:
        return SESSION_MEMORY_MIB << 20
    kv = max(memory.counts.kv[memory.options.kv_cache], 1)
    return max(memory.sessions(batch), 1) * kv


def _spelled(flag: str, value) -> str:
    """The flag as given: a switched-off boolean flag is its --no- form."""
    return flag.replace("--", "--no-", 1) if value is False else flag


def check_mode(args: argparse.Namespace, topology: Topology) -> None:
    """Flags of the other mode are refused, one line with the fix (every rank alike)."""
    if args.shared_stream:
        given = [_spelled(flag, getattr(args, dest)) for dest, flag in SESSION_FLAGS.items()
                 if getattr(args, dest) is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} sets up sessions: drop it, or drop --shared-stream")
        if topology.cfg.replicas > 1:
            raise ConfigError("--replicas splits the ranks into groups serving sessions; one shared stream runs "
                              "on every rank: drop --replicas, or drop --shared-stream")  # fmt: skip
        return
    given = [flag for dest, flag in SHARED_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"{given[0]} applies to one shared stream: add --shared-stream (sessions are paced by "
                          "their viewers' playout and not recorded)")  # fmt: skip
    if topology.cfg.decode_rank:
        raise ConfigError("sessions leave from each group's first rank, which decodes them: drop --decode-rank "
                          "(or add --shared-stream for one stream with a decode rank)")  # fmt: skip
    check_group(topology, args.schedule or "cascade")  # no --schedule: a group of stages cascades


def sessions_preset(args: argparse.Namespace, topology: Topology) -> Preset:
    """The preset as the flags say; a group of several cascade stages without --schedule (or
    --offset) runs the cascade plan at offset 1, as the mission's command means."""
    preset = preset_from_args(args)
    if preset.plan.compute != "selective":
        raise ConfigError(f"sessions keep each stream's KV cache, which --compute {preset.plan.compute} does not "
                          "build: add --compute selective (or --shared-stream for one stream)")  # fmt: skip
    if topology.cascade_size > 1 and args.schedule is None and args.offset is None:
        preset = dataclasses.replace(preset, plan=dataclasses.replace(preset.plan, schedule="cascade", offset=1))
        if topology.rank == SERVING_RANK:
            print(f"note: {topology.cascade_size} cascade stages per group: sessions run the cascade plan at offset "
                  "1 (--schedule and --offset choose another)", file=sys.stderr)  # fmt: skip
    return preset


def check_group(topology: Topology, schedule: str | None) -> None:
    """A group of several cascade stages needs the cascade plan to keep them busy."""
    if topology.cascade_size > 1 and schedule != "cascade":
        per = f"{topology.group_size} processes per group" if topology.cfg.replicas > 1 else \
            f"{topology.world_size} processes"  # fmt: skip
        raise ConfigError(f"{per} make {topology.cascade_size} cascade stages: add --schedule cascade, or "
                          f"--sp {topology.compute_ranks} to shard one forward, or --replicas "
                          f"{topology.world_size} for one replica per process")  # fmt: skip


def _source(args: argparse.Namespace, preset: Preset, topology: Topology):
    """(block source, decoder, cache hit rate) for this rank: the plan on compute ranks, receiving
    on a decode rank."""
    device = rank_device(args, topology)
    dtype = resolve_dtype(args.dtype, device)
    rank = RankRun(preset, weights_from_args(args), device, dtype, topology, speed=speed_from_args(args),
                   gpu_memory=process_from_args(args).get("gpu_memory"))  # fmt: skip
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
    check_mode(args, topology)
    if args.shared_stream:
        serve_shared(args, topology)
    else:
        serve_sessions(args, topology)


def serve_shared(args: argparse.Namespace, topology: Topology) -> None:
    preset = preset_from_args(args)
    for note in single_process_notes(args, topology):
        print(f"note: {note}", file=sys.stderr)
    controls = Controls(args.prompt)
    serving = topology.is_decoder
    stream, recorder, server = None, None, None
    try:
        if serving:  # listen before any weights load: a port in use is said at once
            server = StreamServer(controls, **_server_options(args, preset)).start()
        source, decoder, cache_hits = _source(args, preset, topology)
        stream = LiveStream(source, decoder, controls, topology, steps=preset.sampling.steps, fps=preset.stream.fps,
                            pace=args.pace is not False, on_frames=lambda *a: None, cache_hits=cache_hits)  # fmt: skip
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


def _server_options(args: argparse.Namespace, preset: Preset) -> dict:
    text = preset.text  # a vocabulary model's ack lists the words it will ignore
    ignored = (lambda p: ignored_words(p, text.vocab, text.text_len)) if text.vocab else (lambda p: [])
    return {"host": args.host, "port": args.port, "token": args.token, "allow_origins": tuple(args.allow_origin),
            "ignored_words": ignored, "webrtc": args.webrtc, "ice_servers": tuple(args.ice_server),
            "fps": preset.stream.fps}  # fmt: skip


def serve_sessions(args: argparse.Namespace, topology: Topology, make_manager: Callable | None = None) -> None:
    """Rank 0 serves and leads group 0; every other group's leader runs its group's replica for it,
    and every other rank follows its leader, until told to stop. `make_manager(outbox)` (default:
    the preset's model under SessionManager) is what each rank of a replica runs."""
    preset = sessions_preset(args, topology)
    for note in single_process_notes(args, topology):
        print(f"note: {note}", file=sys.stderr)
    links, cast = replica_links(topology), group_cast(topology)  # every rank, before anything can fail
    serving, server = topology.rank == SERVING_RANK, None
    leading, outbox, local = topology.rank == topology.leader, None, None
    try:
        if serving:  # listen before any weights load: a port in use is said at once
            server = StreamServer.for_sessions(args.prompt, args.seed, **_server_options(args, preset)).start()
            server.lobby.fps = preset.stream.fps
        outbox = Outbox(cast) if cast is not None and leading else None
        manager = (make_manager or (lambda box: _manager(args, preset, topology, box)))(outbox)
        if not serving:  # the serving rank says when to stop: torchrun's Ctrl-C and SIGTERM reach every rank
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        if not leading:
            _say_end(topology, run_follower(manager, cast, topology))
            return
        if not serving:
            _say_end(topology, run_replica(GroupDesk(manager, topology), links[SERVING_RANK], outbox))
            return
        remote = [GroupLink(i, link, peer, topology) for i, (peer, link) in enumerate(sorted(links.items()), start=1)]
        local = LocalReplica(0, GroupDesk(manager, topology), name=_group_name(topology, 0))
        server.lobby.attach([local, *remote])
        print(f"serving {server.url} ({1 + len(remote)} replica(s) of {_group_shape(topology)}, a session per "
              "viewer)", flush=True)  # fmt: skip
        _wait_for_stop()
    finally:
        if server is not None:
            server.stop()  # remote replicas are told to stop, and the local one's loop ends
            if outbox is not None and local is not None and local.failure.endswith("stopped"):
                outbox.stop()  # group 0's other ranks


def _group_name(topology: Topology, leader: int) -> str:
    """`replica 1 (ranks 2-3)`, or `replica 1 (rank 1)` for a group of one."""
    index, size = leader // topology.group_size, topology.group_size
    ranks = f"rank {leader}" if size == 1 else f"ranks {leader}-{leader + size - 1}"
    return f"replica {index} ({ranks})"


def _group_shape(topology: Topology) -> str:
    if topology.group_size == 1:
        return "1 rank"
    parts = [f"cascade {topology.cascade_size}"] if topology.cascade_size > 1 else []
    parts += [f"sp {topology.cfg.sp}"] if topology.cfg.sp > 1 else []
    return " x ".join(parts) + f" ({topology.group_size} ranks)"


class GroupDesk(SessionDesk):
    """A group leader's desk: a failure that came from a peer names the group's rank at fault
    (parallel/faults.py `blame`), which is what its sessions are told when they end."""

    def __init__(self, manager, topology: Topology):
        super().__init__(manager)
        self.topology = topology

    def cycle(self, requests):
        try:
            return super().cycle(requests)
        except Exception as err:
            cause = self.topology.faults.blame(err, self.topology.group_ranks) if self.topology.group_size > 1 else None
            if cause is None:
                raise
            raise RuntimeError(f"{cause} (rank {self.topology.rank} saw: {type(err).__name__})") from err


class GroupLink(RemoteReplica):
    """The serving rank's link to another group's leader: a broken link names the group's rank at
    fault where the job's store can tell (a rank that died takes its leader's link with it)."""

    def __init__(self, index: int, link, leader: int, topology: Topology):
        super().__init__(index, link, rank=leader, name=_group_name(topology, leader))
        self.topology, self.ranks = topology, list(range(leader, leader + topology.group_size))

    def exchange(self, requests):
        try:
            return super().exchange(requests)
        except ReplicaDown:  # the leader's own report: it names the cause already
            raise
        except Exception as err:
            cause = self.topology.faults.blame(err, self.ranks) if len(self.ranks) > 1 else None
            if cause is None:
                raise
            raise RuntimeError(f"{cause} (rank {self.topology.rank} saw: {type(err).__name__})") from err


def run_replica(desk: SessionDesk, link, outbox: Outbox | None) -> str:
    """Another group's leader: serve the serving rank's requests, then stop the group's followers."""
    ended = serve_replica(desk, link)
    if ended == "stopped" and outbox is not None:
        outbox.stop()
    return ended


def run_follower(manager: SessionManager, cast, topology: Topology) -> str:
    """A rank that follows its group's leader: ends when told, or when its group breaks (a peer
    silent past the timeout, an error): then it returns, so that the job's other groups go on."""
    try:
        return follow(manager, cast)
    except Exception as err:
        if not is_peer_trouble(err):  # its own fault: for the leader, which names it to the group's viewers
            topology.faults.note(err)
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _say_end(topology: Topology, ended: str) -> None:
    if ended != "stopped":
        print(f"rank {topology.rank}: replica {ended}", file=sys.stderr, flush=True)


def _manager(args: argparse.Namespace, preset: Preset, topology: Topology, outbox: Outbox | None) -> SessionManager:
    device, process = rank_device(args, topology), process_from_args(args)
    dtype, weights, speed = resolve_dtype(args.dtype, device), weights_from_args(args), speed_from_args(args)
    memory = plan_run(preset, weights, device, dtype, speed, gpu_memory=process.get("gpu_memory"),
                      head_shards=topology.cfg.sp)  # fmt: skip
    session = build_session(preset, weights, device, dtype, topology=topology, speed=speed, memory=memory)
    configure_threads(process.get("threads"), session.model, device)
    return SessionManager(session, session_limits(args, memory), outbox=outbox)


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


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
