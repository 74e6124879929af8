"""WebRTC out (and a camera in) through the real server, with a synthetic stream and no model.

    pytest tests/serving/test_webrtc.py

The server runs in this process; a thread publishes frames whose colour says the prompt version
and whose square moves right, as the engine would. The clients are aiortc peers (the script
client's receiver, and raw ones that misbehave). The browser's side is in test_stream.py.
"""

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from websockets.asyncio.client import connect

pytest.importorskip("aiortc")
from aiortc import RTCPeerConnection, VideoStreamTrack  # noqa: E402
from av import VideoFrame  # noqa: E402

from engine.client import StreamClient  # noqa: E402
from engine.serving.live import Controls  # noqa: E402
from engine.serving.server import StreamServer  # noqa: E402
from engine.serving.webrtc import parse_ice_server  # noqa: E402

SIZE, FPS, BLOCK = 64, 16, 3
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]  # by prompt version: red, blue, green


def picture(index: int, version: int) -> np.ndarray:
    """`[64, 64, 3]`: a square of the version's colour, moving right one pixel a frame."""
    frame = np.full((SIZE, SIZE, 3), 40, np.uint8)
    x = 8 + index % 40
    frame[24:40, x : x + 16] = COLOURS[version % len(COLOURS)]
    return frame


@contextmanager
def running_server(**options):
    controls = Controls("a red circle moving left")
    server = StreamServer(controls, host="127.0.0.1", port=0, fps=FPS, **{"token": None, **options}).start()
    stop = threading.Event()

    def publish():
        index = 0
        while not stop.is_set():
            version = controls.snapshot().version
            frames = np.stack([picture(index + i, version) for i in range(BLOCK)])
            server.hub.publish(frames, index, version, index / FPS)
            index += BLOCK
            time.sleep(BLOCK / FPS)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        yield server, controls
    finally:
        stop.set()
        thread.join()
        server.stop()


def ws(server: StreamServer) -> str:
    return server.url.replace("http", "ws") + "ws"


async def _watch(url: str, frames: int, switch_at: int, transport: str = "webrtc"):
    got, version = [], None
    async with StreamClient.connect(url, transport=transport) as client:
        async for frame in client.frames(seconds=60):
            got.append(frame)
            if len(got) == switch_at:
                version = await client.set_prompt("a blue circle")
            if len(got) >= frames:
                break
        return got, version, client.transport


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def test_frames_come_over_webrtc_with_their_index_and_prompt_version_and_bad_signals_change_nothing():
    with running_server() as (server, controls):
        url = ws(server)
        frames, version, transport = asyncio.run(_watch(url, frames=40, switch_at=10))
        assert transport == "webrtc", "the client's frames came over the WebRTC track"
        indices = [f.index for f in frames]
        assert indices == sorted(indices) and len(set(indices)) == len(indices), indices
        quality = [_psnr(f.image(), picture(f.index, f.prompt_version)) for f in frames]
        assert min(quality) > 25, f"decoded frames against what was sent: PSNR {min(quality):.1f} dB"
        assert {f.prompt_version for f in frames[-5:]} == {version}, "the switch reached the track"
        errors = asyncio.run(_misbehave(url))
        for kind, error in errors.items():
            assert error and "\n" not in error, (kind, error)
        assert "malformed" in errors["bad sdp"] and "session" in errors["other session"], errors
        assert "only a video track" in errors["audio track"], errors
        again, _, transport = asyncio.run(_watch(url, frames=10, switch_at=0))
        assert transport == "webrtc" and len(again) == 10, "the server serves on after the bad signals"
        broadcast = server.hub.broadcasts.get(None)
        assert broadcast is None or len(broadcast.tracks) <= 1, "hung-up tracks are gone"


async def _misbehave(url: str) -> dict[str, str]:
    """One line back for each: a malformed offer, an offer for someone else's session, a
    candidate before any offer, an offer that sends audio."""
    out = {}
    async with connect(url) as socket:
        for kind, message in [
            ("bad sdp", {"type": "offer", "sdp": "v=0\r\nm=video notaport UDP/TLS/RTP/SAVPF 96\r\n"}),
            ("other session", {"type": "offer", "sdp": "v=0\r\n", "session": "not-yours"}),
            ("ice first", {"type": "ice", "candidate": {"candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host"}}),
        ]:
            await socket.send(json.dumps(message))
            out[kind] = (await _reply(socket)).get("error")
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        await socket.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
        replies = [await _reply(socket), await _reply(socket)]  # the answer, and the error about the audio
        out["audio track"] = next((r["error"] for r in replies if r["type"] == "error"), None)
        await pc.close()
    return out


async def _reply(socket) -> dict:
    while True:
        data = json.loads(await asyncio.wait_for(_text(socket), 20))
        if data["type"] not in ("stats", "frame"):
            return data


async def _text(socket) -> str:
    while isinstance(message := await socket.recv(), bytes):
        pass
    return message


class Camera(VideoStreamTrack):
    """A fake camera: 48x80 frames of one colour."""

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(np.full((48, 80, 3), (0, 0, 200), np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class Feed:
    """What a session's video input needs from the server: push and close."""

    def __init__(self):
        self.frames, self.closed = [], False

    def push(self, frame):
        self.frames.append(frame)

    def close(self):
        self.closed = True


def test_a_camera_track_reaches_the_stream_input_and_its_end_closes_it_and_jpeg_is_the_fallback():
    feed = Feed()
    with running_server(video_in=lambda viewer, strength: feed) as (server, _):
        asyncio.run(_send_camera(ws(server), feed))
    assert feed.frames and feed.frames[0].shape == (48, 80, 3) and feed.frames[0][..., 2].mean() > 150
    assert feed.closed, "a camera that stops ends the input"
    with running_server(webrtc=False) as (server, _):
        frames, _, transport = asyncio.run(_watch(ws(server), frames=6, switch_at=0, transport="auto"))
        assert transport == "jpeg" and len(frames) == 6
        assert json.loads(_get(server, "/rtc"))["webrtc"] is False
    with running_server(token="sesame") as (server, _):
        assert "401" in _get(server, "/rtc"), "signalling needs the token like every other path"
        with pytest.raises(Exception, match="401"):
            asyncio.run(_watch(ws(server), frames=1, switch_at=0))


async def _send_camera(url: str, feed: Feed) -> None:
    async with connect(url) as socket:
        pc = RTCPeerConnection()
        camera = Camera()
        pc.addTransceiver(camera, direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        await socket.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
        answer = await _reply(socket)
        assert answer["type"] == "answer", answer
        from aiortc import RTCSessionDescription

        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        deadline = time.monotonic() + 30
        while len(feed.frames) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await pc.close()
        await socket.send(json.dumps({"type": "hangup"}))
        await _reply(socket)


def _get(server: StreamServer, path: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        return f"{err.code}"


def test_ice_servers_are_checked():
    assert parse_ice_server("stun:stun.example.org:3478") == {"urls": "stun:stun.example.org:3478"}
    assert parse_ice_server("turn:u:p@turn.example.org?transport=tcp") == {
        "urls": "turn:turn.example.org?transport=tcp", "username": "u", "credential": "p"}  # fmt: skip
    for bad in ["http://stun.example.org", "stun:", "turn:turn.example.org", "stun:host:99999", "stun:a b"]:
        with pytest.raises(ValueError, match="ICE server|credentials"):
            parse_ice_server(bad)
