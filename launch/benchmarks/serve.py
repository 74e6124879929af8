"""Many sessions on one model: Continuous Play Ratio under Poisson load, the engine vs two baselines.

Viewers arrive as a Poisson process (one arrival trace per load, the same for every policy), each
watches for a random time (uniform in 0.5-1.5x `--watch-s`) and switches its prompt now and then
(Poisson, `--switch-s` apart on average). A refused viewer retries when told to (keeping its place
in the queue) until `--patience-s` has passed, then counts as refused. `--through manager` (the
default): the SessionManager (engine/serving/sessions.py) is driven directly on the real clock, in
this process, without a server or sockets, and time to first frame and stalls are the manager's
(its playout estimate). `--through server`: the engine policies run behind the real session
server on 127.0.0.1 (launch/benchmarks/serve_clients.py), each viewer a WebSocket client that
measures time to first frame and stalls from the frames it receives, against its own playout
clock; the baselines still run through the manager (the table's `through` column says which).
A session's viewer leaving frees its place at once in both (no grace period). Offered load = arrival
rate x mean watch time, in sessions, as multiples of the capacity the engine measures for itself
before the runs (rounds per second at each batch size x frames per round vs sessions x fps).

Policies, each with admission by the KV budget and the measured throughput:
* engine: coalesced rounds of up to `--batch` sessions, least playout slack first, sessions above
  the target slack wait, fidelity lowered (the preset's ladder: fewer steps or a flowcache
  threshold, within the floor) before a stall, full fidelity counted at admission;
* engine-floor: the engine admitting as many sessions as the measured speed keeps at the floor's
  fidelity (Limits.admit_at_floor, the server's default) instead of at full fidelity;
* round-robin: one session per forward, in turn, full fidelity;
* fifo: coalesced rounds in the order sessions were last served, no slack priority, full fidelity.
All three stop generating for a session whose viewer holds more than the target slack (2 s): a
viewer's buffer is bounded in every server, so the baselines differ in order and fidelity only.

`--layouts 1x5 5x1 ...` runs the engine policy as the real multi-rank server instead, one layout
of rank groups after another (replicas x ranks per group: launch/benchmarks/serve_groups.py), at
one offered load of `--offered` sessions for every layout.

Per load and policy: Continuous Play Ratio (share of playout time without a stall, admitted
sessions), time to first frame p50/p99 (from the viewer's first request), stall seconds per
session-minute, aggregate video FPS, sessions admitted / refused, and the PSNR of the engine's
degraded chunks against the same session run alone (same seed, same prompt switches).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import ConfigError
from engine.devices import resolve_device
from engine.eval.metrics import psnr
from engine.serving.scheduler import DEFAULT_FLOOR_DB, Limits, Throughput
from engine.serving.sessions import Opened, SessionManager
from launch.benchmarks.adherence import eval_prompts
from launch.benchmarks.common import session_for
from launch.benchmarks.serve_clients import serve_and_watch
from launch.benchmarks.serve_groups import LayoutSpec, session_fps, watch_layout
from launch.presets import get_preset

COLUMNS = ["load", "offered", "policy", "through", "admitted", "refused", "peak_sessions", "cpr", "ttff_p50_s",
           "ttff_p99_s", "stall_s_per_min", "video_fps", "batch_mean", "degraded_chunks", "degraded_psnr_db",
           "loadavg"]  # fmt: skip
POLICIES = ("engine", "engine-floor", "round-robin", "fifo")
THROUGH_SERVER = ("engine", "engine-floor")
"""Policies `--through server` serves over WebSockets (the baselines stay on the manager)."""
MAX_VIEWERS = 64
LAYOUT_OFFERED = 3.0
DRIVERS = {
    "manager": "SessionManager on the real clock, in process (no server, no sockets)",
    "server": "engine policies: the session server on 127.0.0.1, a WebSocket client per viewer measuring what it "
    "receives; baselines: SessionManager on the real clock",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", help="model preset")
    parser.add_argument("--loads", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                        help="offered loads as multiples of the measured capacity")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=12.0, help="arrivals per load and policy (wall clock)")
    parser.add_argument("--watch-s", type=float, default=5.0, help="mean watching time of a viewer")
    parser.add_argument("--switch-s", type=float, default=3.0, help="mean time between a viewer's prompt switches")
    parser.add_argument("--patience-s", type=float, default=5.0, help="a refused viewer gives up after this")
    parser.add_argument("--batch", type=int, default=4, help="sessions per round (engine and fifo)")
    parser.add_argument("--floor-db", type=float, default=DEFAULT_FLOOR_DB, help="quality floor of degraded chunks")
    parser.add_argument("--kv-budget-mib", type=float, default=64.0, help="KV memory budget")
    parser.add_argument("--admission", choices=["throughput", "memory"], default="throughput",
                        help="memory: admit by the KV budget alone, to see the policies overloaded")  # fmt: skip
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, help="policies to run")
    parser.add_argument("--psnr-sessions", type=int, default=2, help="degraded sessions replayed alone per load")
    parser.add_argument("--psnr-blocks", type=int, default=24, help="blocks replayed per such session at most")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="loads 1 and 2, 6 s each, short viewers")
    parser.add_argument("--seed", type=int, default=0, help="arrival traces' seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--through", choices=["manager", "server"], default="manager",
                        help="server: the engine policies behind the real server on 127.0.0.1, measured by "
                        "WebSocket viewers (manager: the SessionManager driven directly)")  # fmt: skip
    parser.add_argument("--layouts", nargs="+", default=None, metavar="KxG",
                        help="run the real server as K replicas of G ranks each (1x5, 5x1, 2x2, 1x2sp: sp instead "
                        "of a cascade), one layout after another, instead of the policies (default: none)")  # fmt: skip
    parser.add_argument("--offered", type=float, default=None,
                        help=f"--layouts: offered load in sessions, arrival rate x mean watch time (default: "
                        f"{LAYOUT_OFFERED:g})")  # fmt: skip
    parser.add_argument("--max-viewers", type=int, default=None,
                        help=f"--through server: refuse a run of more viewers (default {MAX_VIEWERS})")  # fmt: skip


@dataclass
class Viewer:
    arrival: float
    watch_s: float
    seed: int
    prompts: list[str]
    switches: list[float]
    """Seconds after admission at which it switches to its next prompt."""
    retry_at: float = 0.0
    ticket: str | None = None
    sid: str | None = None
    admitted_at: float | None = None
    first_frame_at: float | None = None
    done: bool = False
    gave_up: bool = False
    chunks: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    prompt_log: list = field(default_factory=list)
    watched_s: float = 0.0
    switched: int = 0
    frames: int = 0
    degraded: int = 0
    """Chunks made at lowered fidelity."""
    left_at: float | None = None


def make_trace(load: float, args, rng: np.random.Generator) -> list[Viewer]:
    """Poisson arrivals at `load / watch_s` per second over `args.seconds`, conditioned on their
    expected count (given the count, a Poisson process's arrival times are uniform): with a
    handful of arrivals per run, an empty or doubled run by chance would say nothing."""
    prompts = [d.prompt for d in eval_prompts(36)]
    count = max(1, round(load / args.watch_s * args.seconds))
    viewers = []
    for t in np.sort(rng.uniform(0.0, args.seconds, size=count)):
        watch = args.watch_s * rng.uniform(0.5, 1.5)
        switches = np.cumsum(rng.exponential(args.switch_s, size=8))
        picks = [prompts[i] for i in rng.integers(len(prompts), size=9)]
        viewers.append(Viewer(float(t), watch, int(rng.integers(1 << 30)), picks, [s for s in switches if s < watch]))
    return viewers


def limits_for(policy: str, args) -> Limits:
    base = Limits(kv_budget_bytes=int(args.kv_budget_mib * 2**20), batch=args.batch, floor_db=args.floor_db,
                  throughput_admission=args.admission == "throughput")  # fmt: skip
    if policy == "round-robin":
        return dataclasses.replace(base, batch=1, order="fifo", degrade=False)
    if policy == "fifo":
        return dataclasses.replace(base, order="fifo", degrade=False)
    return dataclasses.replace(base, admit_at_floor=policy == "engine-floor")


def calibrate(session, args) -> Throughput:
    """Seconds per round at each batch size 1..batch, every session due, full fidelity."""
    limits = dataclasses.replace(
        limits_for("engine", args), degrade=False, target_slack_s=1e9, throughput_admission=False
    )
    measured = Throughput()
    for size in range(1, args.batch + 1):
        mgr = SessionManager(session, limits)
        for i in range(size):
            mgr.open("a red circle moving left", seed=i)
        for _ in range(6):  # warm-up
            mgr.round()
        mgr.throughput = Throughput()
        start = time.monotonic()
        while time.monotonic() - start < (1.0 if args.quick else 2.0):
            mgr.round()
        measured.round_s[size] = mgr.throughput.round_s[size]
    return measured


def end_s(args) -> float:
    """When a run ends, in seconds from its start: arrivals end; the last ones watch a little."""
    return args.seconds + args.watch_s * 0.5


def measure(mgr, viewers: list[Viewer], args, through: str) -> tuple[float, int]:
    """Run the trace on the manager directly, or behind the server with WebSocket viewers: the
    wall seconds it took and the most sessions at once."""
    if through == "server":
        return serve_and_watch(mgr, viewers, args, mgr.fps, end_s(args))
    return drive(mgr, viewers, args)


def server_limits(policy: str, args) -> Limits:
    """The policy's limits, a session suspended as its viewer leaves: out of admission's count and
    the KV budget at once, as `drive` closes it (expiry, later than any run, frees it)."""
    return dataclasses.replace(limits_for(policy, args), grace_s=0.0)


def check_flags(args) -> None:
    """Flags that would do nothing are refused, one line with the fix."""
    if args.offered is not None and not args.layouts:
        raise ConfigError("--offered sets the load of --layouts runs: add --layouts, or use --loads")
    if args.layouts and (args.quick or args.through != "manager" or args.loads != [0.5, 1.0, 2.0]
                         or args.policies != list(POLICIES)):  # fmt: skip
        raise ConfigError("--layouts runs the engine behind the real server at --offered load: drop --quick, "
                          "--through, --loads and --policies")  # fmt: skip
    if args.through == "manager" and args.max_viewers is not None:
        raise ConfigError("--max-viewers bounds --through server: drop it, or add --through server")
    if args.through == "server" and not set(args.policies) & set(THROUGH_SERVER):
        raise ConfigError(f"--through server serves the policies {', '.join(THROUGH_SERVER)} only: add one to "
                          "--policies, or drop --through server")  # fmt: skip
    if args.max_viewers is not None and args.max_viewers < 1:
        raise ConfigError("--max-viewers must be at least 1")


def drive(mgr: SessionManager, viewers: list[Viewer], args) -> tuple[float, int]:
    """Run the trace on the real clock: the wall seconds it took, the most sessions at once."""
    t0, peak = time.monotonic(), 0
    while True:
        now = time.monotonic() - t0
        if now >= end_s(args):
            break
        for viewer in viewers:
            _events(mgr, viewer, now, args)
        out = mgr.round_blocks()
        peak = max(peak, len(mgr.sessions))
        stamp = time.monotonic() - t0
        for viewer in viewers:
            if viewer.sid in out:
                viewer.chunks.extend(out[viewer.sid])
                viewer.frames += sum(len(c.pixels) for c in out[viewer.sid])
                viewer.degraded += sum(c.rung > 0 for c in out[viewer.sid])
                viewer.first_frame_at = viewer.first_frame_at or stamp
        if not out:
            time.sleep(0.002)
    end = time.monotonic() - t0
    for viewer in viewers:
        if viewer.sid is not None and not viewer.done:
            _leave(mgr, viewer, end)
    return end, peak


def _events(mgr: SessionManager, viewer: Viewer, now: float, args) -> None:
    if viewer.done or viewer.gave_up or now < viewer.arrival:
        return
    if viewer.sid is None:
        if now - viewer.arrival > args.patience_s:
            viewer.gave_up = True
        elif now >= viewer.retry_at:
            result = mgr.open(viewer.prompts[0], viewer.seed, viewer.ticket)
            if isinstance(result, Opened):
                viewer.sid, viewer.admitted_at = result.id, now
            else:
                viewer.ticket, viewer.retry_at = result.ticket, now + result.retry_after_s
        return
    watched = now - viewer.admitted_at
    while viewer.switches and watched >= viewer.switches[0]:
        viewer.switches.pop(0)
        viewer.switched += 1
        mgr.set_prompt(viewer.sid, viewer.prompts[viewer.switched % len(viewer.prompts)])
    if watched >= viewer.watch_s:
        _leave(mgr, viewer, now)


def _leave(mgr: SessionManager, viewer: Viewer, now: float) -> None:
    viewer.stats = mgr.stats(viewer.sid)
    viewer.prompt_log = list(mgr.sessions[viewer.sid].prompt_log)
    viewer.watched_s = now - viewer.first_frame_at if viewer.first_frame_at is not None else 0.0
    mgr.close(viewer.sid)
    viewer.done = True


def summarize(load: float, offered: float, policy: str, viewers: list[Viewer], wall: float, mgr) -> dict:
    admitted = [v for v in viewers if v.sid is not None]
    played = sum(v.watched_s for v in admitted)
    stalled = sum(min(v.stats.get("stall_s", 0.0), v.watched_s) for v in admitted)
    ttff = [v.first_frame_at - v.arrival for v in admitted if v.first_frame_at is not None]
    frames = sum(v.frames for v in admitted)
    batches = getattr(mgr, "batches", None) or {}  # a model-free manager in tests counts none
    return {
        "load": load, "offered": round(offered, 2), "policy": policy, "admitted": len(admitted),
        "refused": sum(v.gave_up or v.sid is None for v in viewers),
        "cpr": 1.0 - stalled / played if played else float("nan"),
        "ttff_p50_s": float(np.percentile(ttff, 50)) if ttff else float("nan"),
        "ttff_p99_s": float(np.percentile(ttff, 99)) if ttff else float("nan"),
        "stall_s_per_min": stalled / (played / 60.0) if played else float("nan"),
        "video_fps": frames / wall,
        "batch_mean": sum(k * n for k, n in batches.items()) / max(sum(batches.values()), 1),
        "degraded_chunks": sum(v.degraded for v in admitted),
        "degraded_psnr_db": float("nan"),
    }  # fmt: skip


def degraded_psnr(session, viewers: list[Viewer], args) -> float:
    """Mean PSNR of degraded chunks against the same sessions replayed alone at full fidelity."""
    scores = []
    replayed = [v for v in viewers if any(c.rung > 0 for c in v.chunks)][: args.psnr_sessions]
    for viewer in replayed:
        blocks = min(len(viewer.chunks), args.psnr_blocks)
        log = viewer.prompt_log or [(0, viewer.prompts[0])]
        run = session.run(lambda tick, log=log: [p for t, p in log if t <= tick.index][-1], blocks=blocks,
                          seed=viewer.seed)  # fmt: skip
        for chunk, (_, alone) in zip(viewer.chunks[:blocks], run.frames()):
            if chunk.rung > 0:
                scores.append(min(psnr(chunk.pixels, alone), 99.0))
    return float(np.mean(scores)) if scores else float("nan")


LAYOUT_COLUMNS = ["layout", "ranks", "offered", "admitted", "refused", "peak_sessions", "cpr", "ttff_p50_s",
                  "ttff_p99_s", "session_fps", "video_fps", "loadavg"]  # fmt: skip


def run_layouts(args: argparse.Namespace):
    """The real server in each layout, one after another, under one trace (see the docstring)."""
    check_flags(args)
    args.offered = LAYOUT_OFFERED if args.offered is None else args.offered
    specs = [LayoutSpec.parse(text) for text in args.layouts]
    preset = get_preset(args.preset)
    trace = make_trace(args.offered, args, np.random.default_rng([args.seed, 0]))
    if len(trace) > (args.max_viewers or MAX_VIEWERS):
        raise ConfigError(f"--offered {args.offered:g} makes {len(trace)} viewers, over --max-viewers: lower it")
    load_before, rows = os.getloadavg()[0], []
    for spec in specs:
        viewers, wall, peak = watch_layout(spec, trace, args, preset.stream.fps, end_s(args))
        row = summarize(args.offered, args.offered, "engine", viewers, wall, None)
        row.update(layout=str(spec), ranks=spec.world, peak_sessions=peak, session_fps=session_fps(viewers),
                   loadavg=os.getloadavg()[0])  # fmt: skip
        rows.append(row)
        print(f"{spec}: {row['admitted']} admitted, CPR {row['cpr']:.3f}", flush=True)
    names = ("preset", "layouts", "offered", "seconds", "watch_s", "switch_s", "patience_s", "seed")
    settings = {k: getattr(args, k) for k in names}
    settings.update(threads_per_rank=1, load_average_before=load_before, load_average_after=os.getloadavg()[0],
                    driver="the real server as K x G local ranks (gloo on loopback), WebSocket viewers")  # fmt: skip
    return rows, LAYOUT_COLUMNS, settings


def run(args: argparse.Namespace):
    if args.layouts:
        return run_layouts(args)
    if args.quick:
        args.loads, args.seconds, args.watch_s, args.switch_s, args.psnr_sessions, args.psnr_blocks = (
            [1.0, 2.0], 6.0, 3.0, 1.5, 1, 12)  # fmt: skip
    check_flags(args)
    cap = args.max_viewers or MAX_VIEWERS
    torch.set_num_threads(args.threads)
    session = session_for(get_preset(args.preset), resolve_device(args.device))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    measured = calibrate(session, args)
    probe = SessionManager(session, limits_for("engine", args))
    capacity = measured.sessions(probe.fps, probe.frames_per_tick, probe.limits, most=64)
    at_floor = measured.sessions(probe.fps, probe.frames_per_tick, probe.limits, most=64,
                                 speedup=probe.limits.floor_speedup(session.schedule.steps))  # fmt: skip
    print(f"capacity: {capacity} sessions at {probe.fps} fps ({at_floor} at the floor); ms per round by batch: "
          f"{ {k: round(v * 1000, 1) for k, v in measured.round_s.items()} }", flush=True)  # fmt: skip
    rows = []
    for index, load in enumerate(args.loads):
        offered = load * max(capacity, 1)
        trace = make_trace(offered, args, np.random.default_rng([args.seed, index]))
        turn = index % len(args.policies)  # each policy goes first at some load: none always meets the busiest minute
        if args.through == "server" and len(trace) > cap:
            raise ConfigError(f"load {load:g} makes {len(trace)} viewers in {args.seconds:g} s, over --max-viewers "
                              f"{cap}: lower --loads or --seconds, or raise --max-viewers")  # fmt: skip
        for policy in args.policies[turn:] + args.policies[:turn]:
            through = args.through if policy in THROUGH_SERVER else "manager"
            limits = server_limits(policy, args) if through == "server" else limits_for(policy, args)
            mgr = SessionManager(session, limits)
            mgr.throughput = copy.deepcopy(measured)
            viewers = copy.deepcopy(trace)
            wall, peak = measure(mgr, viewers, args, through)
            rows.append(summarize(load, offered, policy, viewers, wall, mgr))
            rows[-1].update(through=through, peak_sessions=peak)
            rows[-1]["loadavg"] = os.getloadavg()[0]  # the machine's 1-minute load as the run ended
            if policy.startswith("engine") and through == "manager":  # over the server, seeds are the server's
                rows[-1]["degraded_psnr_db"] = degraded_psnr(session, viewers, args)
            print(f"load {load} ({offered:.1f} sessions) {policy}: {len(viewers)} arrivals, "
                  f"CPR {rows[-1]['cpr']:.3f}", flush=True)  # fmt: skip
    rows.sort(key=lambda row: (row["load"], POLICIES.index(row["policy"])))
    names = ("preset", "loads", "seconds", "watch_s", "switch_s", "patience_s", "batch", "floor_db", "kv_budget_mib",
             "admission", "threads", "seed", "through")  # fmt: skip
    settings = {k: getattr(args, k) for k in names}
    settings.update(capacity_sessions=capacity, capacity_at_floor=at_floor,
                    round_ms={k: v * 1000 for k, v in measured.round_s.items()},
                    load_average_before=load_before, load_average_after=os.getloadavg()[0],
                    driver=DRIVERS[args.through], max_viewers=cap if args.through == "server" else None)  # fmt: skip
    return rows, COLUMNS, settings
