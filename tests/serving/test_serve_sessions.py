"""Each viewer its own session: the server over loopback WebSockets, with model-free managers.

    pytest tests/serving/test_serve_sessions.py

The managers are tests/support/serve_fakes.py's (every frame says whose session, block and prompt version
it is), run by the real replica loops (engine/serving/replicas.py) behind the real server.
Assertions count frames and read their colors; none depends on how fast this machine is.
"""

import asyncio
import json
import re
import socket
import time
from contextlib import contextmanager

import numpy as np
import pytest
from serve_fakes import FakeManager, colors, owner
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.serving.live import Cycle, Request, SessionDesk
from engine.serving.protocol import decode_frame
from engine.serving.replicas import LocalReplica, by_headroom, cycle_from, decode, encode, encode_cycle
from engine.serving.server import VIEWER_QUEUE, StreamServer

PROMPT = "a red circle moving left"
SEED = 1


@contextmanager
def serving(*managers: FakeManager, token: str | None = None):
    server = StreamServer.for_sessions(PROMPT, SEED, host="127.0.0.1", port=0, token=token).start()
    server.lobby.attach([LocalReplica(i, SessionDesk(m, stats_every_s=0.1)) for i, m in enumerate(managers)])
    try:
        yield server
    finally:
        server.stop()


def url(server: StreamServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.address[1]}/ws" + (f"?{query}" if query else "")


class Viewer:
    """One WebSocket viewer: its first message (session or refusal), frames, control replies."""

    def __init__(self, ws, hello: dict):
        self.ws, self.hello, self.frames, self.replies, self.stats = ws, hello, [], [], {}
        self._stats_wanted = False

    @classmethod
    async def open(cls, address: str) -> "Viewer":
        ws = await connect(address, max_size=2**24, close_timeout=0.5)  # frames in flight delay a clean close
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return cls(ws, hello)

    async def read(self, frames: int = 0, seconds: float = 20.0, reply: bool = False) -> None:
        """Read until `frames` more frames (or a reply) came; fail after `seconds`."""
        want, deadline = len(self.frames) + frames, time.monotonic() + seconds
        replies = len(self.replies)
        while len(self.frames) < want or (reply and len(self.replies) == replies):
            assert time.monotonic() < deadline, f"waited {seconds} s: {len(self.frames)} frames, {self.replies}"
            message = await asyncio.wait_for(self.ws.recv(), deadline - time.monotonic())
            if isinstance(message, bytes):
                self.frames.append(decode_frame(message))
                continue
            data = json.loads(message)
            if data["type"] == "stats":
                self.stats = data
            if data["type"] != "stats" or self._stats_wanted:
                self.replies.append(data)

    async def ask(self, message: dict) -> dict:
        """The reply to `message` (for stats, the next stats message: pushed ones are as fresh)."""
        self._stats_wanted = message["type"] == "stats"
        await self.ws.send(json.dumps(message))
        await self.read(reply=True)
        self._stats_wanted = False
        return self.replies[-1]

    async def close(self) -> None:
        await self.ws.close()


def test_each_viewer_gets_its_own_session_and_controls_act_on_it_alone():
    async def run(server):
        a, b = await Viewer.open(url(server)), await Viewer.open(url(server))
        assert a.hello["type"] == b.hello["type"] == "session" and a.hello["id"] != b.hello["id"]
        assert a.hello["share"] == f"/?session={a.hello['id']}" and a.hello["seed"] != b.hello["seed"]
        await a.read(6)
        await b.read(6)
        assert {owner(f) for f in a.frames} == {a.hello["seed"]}, "a's frames are a's"
        assert {owner(f) for f in b.frames} == {b.hello["seed"]}, "b's frames are b's"
        ack = await a.ask({"type": "prompt", "text": "a blue square moving up"})
        assert ack == {"type": "ack", "of": "prompt", "version": 1, "text": "a blue square moving up", "ignored": []}
        assert (await a.ask({"type": "pause"}))["of"] == "pause"
        a.frames.clear()
        await b.read(12)
        await asyncio.sleep(0.3)
        assert all(f.prompt_version == 0 for f in b.frames), "b's prompt did not change"
        assert (await a.ask({"type": "stats"}))["paused"] is True
        assert (await b.ask({"type": "stats"}))["paused"] is False
        assert len(a.frames) <= 6, "a paused: at most the blocks already on their way"
        await a.ask({"type": "resume"})
        await a.read(6)
        assert a.frames[-1].prompt_version == 1 and round(colors(a.frames[-1])[2] / 40) == 1
        assert (await a.ask({"type": "stats"}))["last_switch_s"] is not None, "the switch's latency is measured"
        await a.close()
        await b.close()

    with serving(FakeManager()) as server:
        asyncio.run(run(server))


def test_a_joined_session_shares_frames_and_a_dropped_one_resumes():
    async def run(server):
        a = await Viewer.open(url(server))
        await a.read(3)
        joined = await Viewer.open(url(server, f"session={a.hello['id']}"))
        assert joined.hello["id"] == a.hello["id"]
        await joined.read(6)
        assert {owner(f) for f in joined.frames} == {a.hello["seed"]}
        assert (await joined.ask({"type": "stats"}))["viewers"] == 2
        await joined.close()
        last = a.frames[-1].index
        await a.close()  # the session's last viewer leaves: it waits out the grace period
        await asyncio.sleep(0.2)
        back = await Viewer.open(url(server, f"session={a.hello['id']}"))
        assert back.hello["type"] == "session" and back.hello["id"] == a.hello["id"]
        await back.read(3)
        assert back.frames[0].index > last, "the same session's stream goes on"
        await back.close()
        unknown = await Viewer.open(url(server, "session=nonsense"))
        assert unknown.hello["type"] == "ended" and "no such session" in unknown.hello["reason"]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(unknown.ws.recv(), 10)

    with serving(FakeManager()) as server:
        asyncio.run(run(server))


def test_a_session_past_its_grace_period_has_ended():
    async def run(server):
        a = await Viewer.open(url(server))
        await a.read(3)
        await a.close()
        await asyncio.sleep(1.0)  # grace 0.2 s; the desk reports gone sessions within 0.1 s
        back = await Viewer.open(url(server, f"session={a.hello['id']}"))
        assert back.hello["type"] == "ended", back.hello
        await back.close()

    with serving(FakeManager(grace_s=0.2)) as server:
        asyncio.run(run(server))


def test_beyond_admission_a_viewer_is_told_why_and_closed():
    async def run(server):
        kept = [await Viewer.open(url(server)) for _ in range(2)]
        refused = await Viewer.open(url(server))
        assert refused.hello == {"type": "refused", "reason": "all sessions taken", "retry_after_s": 2.5,
                                 "queue_position": 1, "ticket": "0.t1", "offer_fps": None}  # fmt: skip
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(refused.ws.recv(), 10)
        assert closed.value.rcvd.code == 1013
        again = await Viewer.open(url(server, "ticket=0.t1"))
        assert again.hello["type"] == "refused" and manager.tickets[-1] == "t1", "the place in the queue is kept"
        for viewer in kept:
            await viewer.read(3)
        await asyncio.gather(*(v.close() for v in kept))

    manager = FakeManager(capacity=2)
    with serving(manager) as server:
        asyncio.run(run(server))


def test_a_flood_of_connects_is_answered_and_bounded():
    """60 connections at once: each gets a session or a refusal within the timeout, none hangs;
    the sessions admitted keep streaming."""

    async def run(server):
        viewers = await asyncio.gather(*(Viewer.open(url(server)) for _ in range(60)))
        kinds = [v.hello["type"] for v in viewers]
        assert kinds.count("session") == 3 and kinds.count("refused") == 57, kinds
        admitted = [v for v in viewers if v.hello["type"] == "session"]
        for viewer in admitted:
            await viewer.read(6)
        await asyncio.gather(*(v.close() for v in viewers))
        assert server.lobby.summary()["sessions_refused_total"] == 57

    with serving(FakeManager(capacity=3)) as server:
        asyncio.run(run(server))


def test_bad_messages_and_a_stalled_viewer_leave_other_sessions_alone():
    """Session A floods garbage and has a viewer that never reads; session B gets every frame
    made for it (each index in its span arrived or is counted as dropped for it: none is)."""

    async def run(server, port):
        a = await Viewer.open(url(server))
        await a.read(3)
        stalled = _stalled_viewer(port, a.hello["id"])
        b = await Viewer.open(url(server))
        for message in ["hello", b"\x00\xff", '{"type": "reboot"}', "[]" * 3000, '{"type": "prompt"}'] * 10:
            await a.ws.send(message)
        while len(a.replies) < 50:
            await a.read(reply=True)
        assert all(r["type"] == "error" for r in a.replies), "each bad message got an error"
        deadline = time.monotonic() + 120
        while (await a.ask({"type": "stats"}))["session_dropped"] < VIEWER_QUEUE:  # the stalled viewer's losses
            assert time.monotonic() < deadline, "the stalled viewer never lost a queue's worth of frames"
            await b.read(30)
        stats = await b.ask({"type": "stats"})
        indices = [f.index for f in b.frames]
        missing = indices[-1] + 1 - len(indices)
        assert indices == sorted(indices) and missing <= stats["encoder_dropped"], "b lost frames it never counted"
        assert stats["you_dropped"] == 0 and stats["session_dropped"] == 0, stats
        stalled.close()
        await asyncio.gather(a.close(), b.close())

    with serving(FakeManager(size=64, fps=96, lead_s=0.1)) as server:
        asyncio.run(run(server, server.address[1]))


def test_hostile_uploads_get_one_line_errors_and_a_good_one_restarts_only_its_session():
    """Too large, another type, corrupt, a bomb's header: an error to that viewer only, nothing
    reaches a manager; an image of another resolution is passed on; past twice the limit the
    connection closes (1009); the other session streams throughout."""
    import base64
    import io
    import zlib

    from PIL import Image

    from engine.serving.protocol import MAX_UPLOAD_BYTES, UPLOAD_MAGIC

    image = io.BytesIO()
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(image, format="PNG")
    png = image.getvalue()
    bomb = bytearray(png)  # a header that claims 20000 x 20000 pixels, its checksum made right
    bomb[16:24] = (20000).to_bytes(4, "big") * 2
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    hostile = {
        "over the limit": b"\x00" * (MAX_UPLOAD_BYTES + 10),
        "not an image or video": b"#!/bin/sh\nrm -rf /\n",
        "corrupt PNG": png[:50],
        "pixels; scale it down": bytes(bomb),
        "needs a file": b"",
    }

    async def run(server, manager):
        a, b = await Viewer.open(url(server)), await Viewer.open(url(server))
        await b.read(2)
        for says, data in hostile.items():
            await a.ws.send(UPLOAD_MAGIC + data)
            await a.read(reply=True)
            assert a.replies[-1]["type"] == "error" and says in a.replies[-1]["error"], (says, a.replies[-1])
        assert manager.uploads == [], "nothing hostile reached a manager"
        await a.ws.send(UPLOAD_MAGIC + png)
        await a.read(reply=True)
        assert a.replies[-1] == {"type": "ack", "of": "start", "blocks": 1}
        assert manager.uploads == [(manager_id(manager, 1), base64.b64encode(png).decode())]
        with pytest.raises(ConnectionClosed) as closed:
            await a.ws.send(UPLOAD_MAGIC + b"\x00" * (2 * MAX_UPLOAD_BYTES + 64))
            await a.read(reply=True, seconds=10)
        assert closed.value.rcvd.code == 1009
        before = len(b.frames)
        await b.read(3)
        assert len(b.frames) >= before + 3, "the other session streamed on"
        await b.close()

    manager = FakeManager(size=16, fps=48)
    with serving(manager) as server:
        asyncio.run(run(server, manager))


def test_a_clip_uploaded_for_video_in_reaches_only_its_session_and_bad_ones_get_one_line(tmp_path):
    """b"ARCV" + float32 strength + clip: a bad strength, an image, a non-video are refused to that
    viewer alone and reach no manager; a clip reaches its session's `video_in` decoded, with its
    strength."""
    import io
    import struct

    from PIL import Image

    from engine.serving.protocol import VIDEO_IN_MAGIC
    from engine.serving.video import Mp4Writer

    with Mp4Writer(tmp_path / "clip.mp4", fps=16, width=16, height=16) as writer:
        writer.write(np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(6)]))
    clip = (tmp_path / "clip.mp4").read_bytes()
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image, format="PNG")
    refused = {
        "strength must lie in (0, 1], got 1.5": struct.pack("<f", 1.5) + clip,
        "a clip, not an image": struct.pack("<f", 0.5) + image.getvalue(),
        "not an image or video": struct.pack("<f", 0.5) + b"#!/bin/sh\n",
        "float32 strength": b"\x00",
    }

    async def run(server, manager):
        a = await Viewer.open(url(server))
        for says, body in refused.items():
            await a.ws.send(VIDEO_IN_MAGIC + body)
            await a.read(reply=True)
            assert a.replies[-1]["type"] == "error" and says in a.replies[-1]["error"], (says, a.replies[-1])
        assert manager.video_ins == [], "nothing refused reached a manager"
        await a.ws.send(VIDEO_IN_MAGIC + struct.pack("<f", 0.5) + clip)
        await a.read(reply=True)
        assert a.replies[-1] == {"type": "ack", "of": "video_in", "frames": 6, "strength": 0.5}
        ((sid, frames, strength),) = manager.video_ins
        assert sid == manager_id(manager, 1) and strength == 0.5 and len(frames) == 6 and frames[0].shape == (16, 16, 3)
        await a.close()

    manager = FakeManager(size=16, fps=48)
    with serving(manager) as server:
        asyncio.run(run(server, manager))


def manager_id(manager: FakeManager, number: int) -> str:
    return f"{manager.name}{number}"


def _stalled_viewer(port: int, session: str) -> socket.socket:
    """A raw WebSocket handshake into `session`, then never a read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall((f"GET /ws?session={session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
    return sock


def test_a_failed_replica_ends_its_sessions_and_the_others_stream_on():
    first, second = FakeManager(name="x"), FakeManager(name="y")

    async def run(server):
        viewers = [await Viewer.open(url(server)) for _ in range(4)]
        on = {v.hello["replica"] for v in viewers}
        assert on == {0, 1}, "placed on the replica with most room: both are used"
        second.explode()
        doomed = [v for v in viewers if v.hello["replica"] == 1]
        for viewer in doomed:
            with pytest.raises(ConnectionClosed):
                await viewer.read(10_000)
            ended = viewer.replies[-1]
            assert ended["type"] == "ended" and "replica 1 failed" in ended["reason"], ended
        for viewer in viewers:
            if viewer not in doomed:
                await viewer.read(6)
        fresh = await Viewer.open(url(server))
        assert fresh.hello["type"] == "session" and fresh.hello["replica"] == 0
        stats = json.loads(_http(server.address[1], "/stats").split(b"\r\n\r\n", 1)[1])
        assert [r["up"] for r in stats["replicas"]] == [True, False]
        await asyncio.gather(*(v.close() for v in viewers + [fresh]))

    with serving(first, second) as server:
        asyncio.run(run(server))


def _http(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_stats_and_metrics_endpoints_under_the_page_access_policy():
    async def run(server, port):
        a = await Viewer.open(url(server, "token=sesame"))
        await a.read(6)
        await asyncio.sleep(0.3)  # the desk's stats refresh
        assert _http(port, "/metrics").startswith(b"HTTP/1.1 401")
        assert _http(port, "/stats").startswith(b"HTTP/1.1 401")
        metrics = _http(port, "/metrics?token=sesame").decode()
        head, body = metrics.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
        values = dict(re.findall(r"^(arcade_\S+) (\S+)$", body, re.M))
        assert values["arcade_sessions"] == "1" and values["arcade_replicas_up"] == "1"
        assert values['arcade_replica_active{replica="0"}'] == "1"
        assert float(values['arcade_session_slack_s{session="1"}']) == 0.25
        assert all(line.startswith("# TYPE ") or re.match(r"^arcade_\w+(\{\w+=\"[^\"]*\"\})? \S+$", line)
                   for line in body.strip().splitlines())  # fmt: skip
        stats = json.loads(_http(port, "/stats?token=sesame").split(b"\r\n\r\n", 1)[1])
        assert stats["mode"] == "sessions" and stats["per_session"][0]["frames"] >= 6
        assert a.hello["id"] not in json.dumps(stats), "stats do not give session ids away"
        seen = await a.ask({"type": "stats"})
        assert {"slack_s", "stalls", "fidelity", "fps", "session", "viewers"} <= set(seen)
        await a.close()

    with serving(FakeManager(), token="sesame") as server:
        asyncio.run(run(server, server.address[1]))


def test_viewers_before_the_model_loads_are_told_to_retry():
    async def run(server):
        early = await Viewer.open(url(server))
        assert early.hello["type"] == "refused" and early.hello["retry_after_s"] > 0
        assert "loading" in early.hello["reason"]

    server = StreamServer.for_sessions(PROMPT, SEED, host="127.0.0.1", port=0, token=None).start()
    try:
        asyncio.run(run(server))
    finally:
        server.stop()


# -- pieces -----------------------------------------------------------------------------------------


def test_a_cycle_survives_the_trip_between_ranks():
    blocks = {"a": [np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)], "b": []}
    answers = {3: {"ok": {"id": "a"}}, 4: {"error": "no session z"}}
    cycle = Cycle(answers, blocks, {"a": [2], "b": []}, {"a": {"slack_s": 1.5}}, {"active": 1}, ("c",))
    back = cycle_from(*decode(encode_cycle(cycle)))
    assert back.answers == cycle.answers and back.versions == cycle.versions and back.gone == ("c",)
    assert back.stats == cycle.stats and back.server == cycle.server
    assert np.array_equal(back.blocks["a"][0], blocks["a"][0]) and back.blocks["b"] == []
    assert decode(encode({"requests": [[1, "open", ["p", 3]]]}))[0] == {"requests": [[1, "open", ["p", 3]]]}


def test_the_desk_counts_versions_and_refuses_unknown_operations():
    manager = FakeManager()
    desk = SessionDesk(manager)
    opened = desk.cycle([Request(1, "open", ("p", 0))]).answers[1]["ok"]
    session = opened["id"]
    answers = desk.cycle([Request(2, "set_prompt", (session, "q")), Request(3, "set_prompt", (session, "r")),
                          Request(4, "explode", ()), Request(5, "pause", ("nobody",))]).answers  # fmt: skip
    assert answers[2] == {"ok": {"version": 1}} and answers[3] == {"ok": {"version": 2}}
    assert "unknown operation" in answers[4]["error"] and "nobody" in answers[5]["error"]
    assert not manager._boom, "only SESSION_OPS reach the manager"


def test_placement_prefers_the_most_headroom():
    replicas = [LocalReplica(i, SessionDesk(FakeManager())) for i in range(3)]
    replicas[0].server = {"active": 2, "capacity": 3}
    replicas[1].server = {"active": 0, "capacity": 3}
    replicas[2].server = {"headroom": 2}
    assert [r.index for r in by_headroom(replicas)] == [1, 2, 0]
    replicas[1].placed_since_stats = 2
    replicas[2].alive = False
    assert [r.index for r in by_headroom(replicas)] == [0, 1]


def test_session_flags_reach_the_limits_or_are_refused():
    from engine.config import ConfigError
    from launch.stream import check_mode, parse_args, session_limits
    from parallel.topology import Topology

    default = session_limits(parse_args([]))
    for argv, field, value in [
        (["--session-memory", "64"], "kv_budget_bytes", 64 << 20),
        (["--grace", "2.5"], "grace_s", 2.5),
        (["--session-batch", "7"], "batch", 7),
        (["--no-admit-at-floor"], "admit_at_floor", False),
    ]:
        limits = session_limits(parse_args(argv))
        assert getattr(limits, field) == value != getattr(default, field), argv
        with pytest.raises(ConfigError, match=argv[0]):
            check_mode(parse_args([*argv, "--shared-stream"]), Topology.single())
    assert parse_args(["--shared-stream"]).shared_stream and not parse_args([]).shared_stream
    for argv in (["--record", "x.mp4"], ["--no-pace"]):
        with pytest.raises(ConfigError, match=f"{argv[0]} applies to one shared stream: add --shared-stream"):
            check_mode(parse_args(argv), Topology.single())
        check_mode(parse_args([*argv, "--shared-stream"]), Topology.single())


def test_the_client_opens_joins_and_is_refused():
    from engine.serving.client import Refused, StreamClient, build_parser, watch

    async def run(server):
        async with StreamClient.connect(url(server)) as client:
            assert client.session["id"] and (await client.set_prompt("a blue square moving up")) == 1
            args = build_parser().parse_args(
                ["--url", url(server), "--session", client.session["id"], "--seconds", "1"]
            )
            joined = await watch(args)
            assert joined["session"] == client.session["id"] and joined["frames"] > 0
            async with StreamClient.connect(url(server)):  # the second and last place
                with pytest.raises(Refused) as refused:
                    async with StreamClient.connect(url(server)):
                        pass
                assert refused.value.info["retry_after_s"] == 2.5

    with serving(FakeManager(capacity=2)) as server:
        asyncio.run(run(server))


def test_an_offer_is_shown_and_taken_by_the_client_and_close_reasons_fit_their_frame():
    from engine.serving.client import Refused, StreamClient
    from engine.serving.protocol import MAX_CLOSE_REASON_BYTES, close_reason

    async def run(server):
        async with StreamClient.connect(url(server)):
            with pytest.raises(Refused) as refused:
                async with StreamClient.connect(url(server)):
                    pass
            assert refused.value.info["offer_fps"] == 7.5
            async with StreamClient.connect(url(server), accept=True) as taken:
                assert taken.session["id"], "the offer taken"
                with pytest.raises(Refused) as last:  # one over capacity is all that is offered
                    async with StreamClient.connect(url(server), accept=True):
                        pass
                assert last.value.info["offer_fps"] is None

    with serving(FakeManager(capacity=1, offer_fps=7.5)) as server:
        asyncio.run(run(server))
    long = "server full: the engine keeps 2 sessions at full frame rate at the quality floor and runs 2; " * 2
    for text in (long, "ü" * 100, "x" * 200, "short enough"):
        fitted = close_reason(text)
        assert len(fitted.encode()) <= MAX_CLOSE_REASON_BYTES, text
        assert fitted == text or (fitted.endswith("...") and text.startswith(fitted[:-3])), (fitted, text)
    assert close_reason(long).removesuffix("...").split(" ")[-1] in long.split(" "), "cut between words"
