"""The serve bench's viewers through the real session server: WebSocket clients on loopback.

The manager runs behind the server it runs behind in `python -m engine.stream` (StreamServer's
lobby, one in-process replica, JPEG frames over WebSockets), bound to 127.0.0.1 on a free port.
Each viewer of the trace connects at its arrival time, retries when refused (passing its queue
ticket back, `?ticket=`) until its patience runs out, sends its prompt and its prompt switches,
and leaves after its watching time (or when the run ends). It measures only what it receives:
its first frame's arrival, and a playout clock of its own (scheduler.Playout, the one the manager
keeps for its estimate) that starts at its first frame and plays the frames received at the
stream's fps; a stall is playout reaching the last frame received.

Bounded: loopback only, at most `max_viewers` viewers per run (the caller refuses more), and a
run is cut off HARD_STOP_S after its own end.
"""

from __future__ import annotations

import asyncio
import time

from engine.serving.client import Refused, StreamClient
from engine.serving.live import SessionDesk
from engine.serving.replicas import LocalReplica
from engine.serving.scheduler import Playout
from engine.serving.server import StreamServer

HOST = "127.0.0.1"
HARD_STOP_S = 30.0
"""A run's viewers are cut off this long after the run's end (a hung connection ends nothing)."""
RETRY_S = 1.0
"""Retry-after for a refusal that gives none (e.g. the replica not ready yet)."""


def serve_and_watch(manager, viewers: list, args, fps: float, end_s: float) -> tuple[float, int]:
    """Serve `manager` on loopback and run the viewers against it until `end_s` (seconds from the
    start): the wall seconds it took and the most viewers watching at once."""
    server = StreamServer.for_sessions("a red circle moving left", 0, host=HOST, port=0, token=None).start()
    server.lobby.fps = fps
    try:
        server.lobby.attach([LocalReplica(0, SessionDesk(manager), name="bench replica")])
        url = f"ws://{HOST}:{server.address[1]}/ws"
        wall = asyncio.run(_watch_all(url, viewers, args, fps, end_s))
        failure = server.lobby.replicas[0].failure
    finally:
        server.stop()
    if failure:  # its sessions ended mid-run: the numbers would measure the failure
        raise RuntimeError(f"the server's replica failed during the run: {failure}")
    return wall, peak_watching(viewers)


async def _watch_all(url: str, viewers: list, args, fps: float, end_s: float) -> float:
    t0 = time.monotonic()
    runs = asyncio.gather(*(_viewer(url, v, t0, args, fps, end_s) for v in viewers))
    try:
        await asyncio.wait_for(runs, timeout=end_s + HARD_STOP_S)
    except TimeoutError:
        pass  # viewers cut off keep what they measured; the rest count as refused
    return time.monotonic() - t0


async def _viewer(url: str, viewer, t0: float, args, fps: float, end_s: float) -> None:
    """Connect at arrival, retry when told to, watch once admitted."""
    clock = lambda: time.monotonic() - t0  # noqa: E731
    viewer.retry_at = viewer.arrival
    while viewer.retry_at < end_s and viewer.retry_at - viewer.arrival <= args.patience_s:
        await asyncio.sleep(max(viewer.retry_at - clock(), 0.0))
        query = f"?ticket={viewer.ticket}" if viewer.ticket else ""
        try:
            async with StreamClient.connect(url + query) as client:
                if client.session is not None:
                    viewer.sid, viewer.admitted_at = client.session["id"], clock()
                    await _watch(client, viewer, clock, fps, min(viewer.admitted_at + viewer.watch_s, end_s))
                    return
            viewer.retry_at = clock() + RETRY_S  # no session and no refusal: the server was not ready
        except Refused as refused:
            viewer.ticket = refused.info.get("ticket")
            viewer.retry_at = clock() + (refused.info.get("retry_after_s") or RETRY_S)
    viewer.gave_up = True


async def _watch(client: StreamClient, viewer, clock, fps: float, leave_at: float) -> None:
    """Play what arrives until `leave_at`; the prompt switches run beside it."""
    playout = Playout(fps)
    switching = asyncio.create_task(_switch(client, viewer, clock))
    try:
        async for _frame in client.frames(seconds=max(leave_at - clock(), 0.0)):
            now = clock()
            viewer.first_frame_at = now if viewer.first_frame_at is None else viewer.first_frame_at
            viewer.frames += 1
            playout.add(1, now)
    finally:
        switching.cancel()
        await asyncio.gather(switching, return_exceptions=True)
    viewer.left_at = max(clock(), leave_at)  # a session ended early stalls its viewer until it leaves
    playout.advance(viewer.left_at)
    viewer.watched_s = viewer.left_at - viewer.first_frame_at if viewer.first_frame_at is not None else 0.0
    viewer.stats = {"stall_s": playout.stall_s, "stalls": playout.stalls, "server": dict(client.stats)}
    viewer.degraded = int(client.stats.get("degraded_blocks") or 0)  # the server's count, pushed each second


async def _switch(client: StreamClient, viewer, clock) -> None:
    """The viewer's prompt at once (the server opened the session with its own), then its switches."""
    await client.set_prompt(viewer.prompts[0])
    for at in viewer.switches:
        await asyncio.sleep(max(viewer.admitted_at + at - clock(), 0.0))
        viewer.switched += 1
        await client.set_prompt(viewer.prompts[viewer.switched % len(viewer.prompts)])


def peak_watching(viewers: list) -> int:
    """The most viewers between admission and leaving at any one time."""
    spans = [(v.admitted_at, v.left_at) for v in viewers if v.admitted_at is not None and v.left_at is not None]
    return max((sum(a <= start < b for a, b in spans) for start, _ in spans), default=0)
