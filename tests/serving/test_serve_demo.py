"""The demo model behind the real server: two viewers at once, each its own prompt, then a third
offered a lower frame rate (and taking it), a fourth queued behind it and then refused (the KV
memory is full), over loopback WebSockets.

    pytest tests/serving/test_serve_demo.py

The manager's measured speed is injected (what a 2-core machine measures when it is not shared:
30 ms a round for one session, 45 ms for two), so admission does not depend on this machine's
load; the frames are the model's. Nothing asserts how fast they come.
"""

import asyncio

import pytest
import torch
from websockets.exceptions import ConnectionClosed

from engine.serving.live import SessionDesk
from engine.serving.protocol import MAX_CLOSE_REASON_BYTES, close_reason
from engine.serving.replicas import LocalReplica
from engine.serving.scheduler import Limits, Throughput
from engine.serving.server import StreamServer
from engine.serving.sessions import SessionManager
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.presets import get_preset
from tests.serving.test_serve_sessions import Viewer, url


class Measured(Throughput):
    """Seconds per round as given, not as this (shared) machine's rounds take."""

    def record(self, batch: int, seconds: float) -> None:
        pass


@pytest.fixture(scope="module")
def manager():
    torch.set_grad_enabled(False)
    session = build_session(get_preset("demo"), WeightPaths(), torch.device("cpu"), torch.float32)
    probe = SessionManager(session, Limits(kv_budget_bytes=64 << 20))
    mgr = SessionManager(session, Limits(kv_budget_bytes=int(3.5 * probe.kv_per_session)))
    mgr.throughput = Measured(round_s={1: 0.03, 2: 0.045})
    return mgr


async def until_version(viewer: Viewer, version: int, seconds: float = 180.0) -> None:
    while not viewer.frames or viewer.frames[-1].prompt_version < version:
        await viewer.read(1, seconds=seconds)


async def closed_with(viewer: Viewer) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(viewer.ws.recv(), 10)
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_two_viewers_are_served_a_third_takes_an_offer_a_fourth_is_refused(manager):
    async def run(server):
        a, b = await Viewer.open(url(server)), await Viewer.open(url(server))
        assert a.hello["type"] == b.hello["type"] == "session", (a.hello, b.hello)
        assert (await a.ask({"type": "prompt", "text": "a green triangle moving up"}))["version"] == 2
        assert (await b.ask({"type": "prompt", "text": "a blue square moving down"}))["version"] == 2
        await until_version(a, 2)
        await until_version(b, 2)

        third = await Viewer.open(url(server))
        assert third.hello["type"] == "refused" and third.hello["offer_fps"] == 15.0, third.hello
        code, reason = await closed_with(third)
        assert code == 1013 and reason == close_reason(third.hello["reason"]) and reason.endswith("...")
        assert len(reason.encode()) <= MAX_CLOSE_REASON_BYTES < len(third.hello["reason"].encode())
        waiting = await Viewer.open(url(server))  # a fourth: second in the queue, offered the same
        assert waiting.hello["queue_position"] == 2 and waiting.hello["offer_fps"] == 15.0, waiting.hello
        assert (await closed_with(waiting))[0] == 1013
        taken = await Viewer.open(url(server, f"accept=1&ticket={third.hello['ticket']}"))
        assert taken.hello["type"] == "session", taken.hello
        await taken.read(1, seconds=180)

        fourth = await Viewer.open(url(server, f"accept=1&ticket={waiting.hello['ticket']}"))
        assert fourth.hello["type"] == "refused" and fourth.hello["offer_fps"] is None, fourth.hello
        assert fourth.hello["queue_position"] == 1, "its place kept, now first"
        assert "KV memory is full" in fourth.hello["reason"]
        assert (await closed_with(fourth))[0] == 1013
        await asyncio.gather(a.ws.close(), b.ws.close(), taken.ws.close())

    server = StreamServer.for_sessions("a red circle moving left", 0, host="127.0.0.1", port=0, token=None).start()
    server.lobby.fps = manager.fps
    server.lobby.attach([LocalReplica(0, SessionDesk(manager, stats_every_s=0.2))])
    try:
        asyncio.run(run(server))
    finally:
        server.stop()
