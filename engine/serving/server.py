"""Serving one stream to viewers: the page at `/`, frames and control over a WebSocket at `/ws`.

The engine never waits on a viewer. Frames go from the generation thread into a bounded queue;
an encoder thread turns them into JPEG frame messages (engine/serving/protocol.py) and hands each to every
viewer's own bounded queue on the event loop. A queue that is full drops its oldest frame and
counts the drop, so a viewer that reads slowly, or not at all, loses frames and slows no one.

Access (engine/serving/access.py): the server binds to 127.0.0.1 unless told otherwise; binding
elsewhere needs a token, which the page and the WebSocket then require as `?token=...`. Browsers'
WebSockets are accepted from this server's own page or allowed origins only, and without a token
only requests that name the server by an address or localhost are answered (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from engine.media import MediaError, MediaLimits, load_media
from engine.serving.access import AccessPolicy, parse_origin
from engine.serving.controls import Controls
from engine.serving.live import Stats
from engine.serving.lobby import Lobby, Refusal, Watched
from engine.serving.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_UPLOAD_BYTES,
    PROMETHEUS_TYPE,
    SIGNALS,
    UPLOAD_MAGIC,
    Control,
    ProtocolError,
    close_reason,
    encode_frame,
    is_upload,
    is_video_in,
    parse_control,
    prometheus,
    reply,
    upload_file,
    video_in_upload,
)
from engine.serving.signalling import Signalling
from engine.serving.webrtc import AIORTC, Broadcast, FrameInfo, Peer, announce_encoder, choose_encoder

PAGE = Path(__file__).with_name("viewer.html")
VIEWER_QUEUE = 48  # frames a viewer may fall behind before its oldest ones are dropped
VIEWER_SEND_BUFFER = 128 * 1024
"""Kernel send buffer per viewer (Linux doubles it). Left to autotuning it grows to tcp_wmem's
maximum (4 MiB by default) for a viewer that stops reading: memory per connection, and thousands
of stale frames held before the viewer's own queue, which drops the oldest, comes into play."""
ENCODER_QUEUE = 8  # blocks waiting for JPEG encoding before the oldest is dropped
STATS_EVERY_S = 1.0
MAX_VIEWERS = 256
"""Connections at once; more are refused (retry later), so a flood of connects stays bounded."""
TOO_MANY_RETRY_S = 10.0
CLOSE_TIMEOUT_S = 2.0
"""How long a closing handshake may wait for a viewer that does not answer it (a stop waits as long)."""
CLOSE_ABOVE_BYTES = 16 * MAX_MESSAGE_BYTES
"""Messages over MAX_MESSAGE_BYTES get an error reply; over this, the connection is closed (1009)."""
PAGE_PATHS = ("/", "/index.html")
FAVICON = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="6" fill="#2a4"/></svg>'


def needs_token(host: str) -> bool:
    """Anything but a loopback address ("" and 0.0.0.0 mean every interface) is reachable from elsewhere."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # "", or a host name other than localhost
        return True


@dataclass(eq=False)  # viewers are kept in a set, by identity
class Viewer:
    connection: ServerConnection
    frames: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(VIEWER_QUEUE))
    dropped: int = 0
    session: Watched | None = None
    peer: Peer | None = None
    rtc_live: bool = False
    """Its WebRTC track carries its frames: no JPEG for it until that stops."""


class Hub:
    """Frames in from the engine (any thread), out to viewers, never blocking the engine.

    Blocks wait for JPEG encoding in one bounded queue per audience (a session, or None: every
    viewer of a shared stream), taken in turn, so a session with a burst of blocks drops its own
    oldest ones and delays no other session's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fps: int = 16):
        self.loop, self.fps = loop, fps
        self.viewers: set[Viewer] = set()
        self.broadcasts: dict[object, Broadcast] = {}  # audience -> its WebRTC encoders and tracks
        self.encoder_dropped = 0
        self.viewers_dropped = 0  # by every viewer's queue, since the start
        self._pending: dict[object, deque] = {}
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._encode_forever, name="frame-encoder", daemon=True)
        self._thread.start()

    def publish(self, frames: np.ndarray, first_index: int, version: int, seconds: float, audience=None) -> None:
        """Called by the engine with each finished block's frames `[N, H, W, 3]` uint8; `audience`:
        the session whose viewers get them (None: every viewer). No viewer, no encoding."""
        if audience is not None and not audience.viewers:
            return
        with self._ready:
            pending = self._pending.setdefault(audience, deque())
            if len(pending) >= ENCODER_QUEUE:
                lost = len(pending.popleft()[0])
                self.encoder_dropped += lost
                if audience is not None:
                    audience.encoder_dropped += lost
            pending.append((frames, first_index, version, seconds, time.time()))
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _next(self) -> list[tuple[object, tuple]]:
        """One block from each audience with blocks waiting (empty: closed)."""
        with self._ready:
            while not self._closed and not self._pending:
                self._ready.wait()
            taken = [(audience, pending.popleft()) for audience, pending in self._pending.items()]
            self._pending = {a: p for a, p in self._pending.items() if p}
            return [] if self._closed else taken

    def _encode_forever(self) -> None:
        """JPEG for the audience's viewers without a live WebRTC track; packets for those with one."""
        while taken := self._next():
            for audience, (frames, first_index, version, seconds, made_at) in taken:
                viewers = list(self.viewers if audience is None else audience.viewers)
                jpeg = any(not viewer.rtc_live for viewer in viewers)
                broadcast = self.broadcasts.get(audience)
                for i, frame in enumerate(frames):
                    if jpeg:
                        message = encode_frame(first_index + i, seconds, version, frame)
                        self.loop.call_soon_threadsafe(self._fan_out, message, audience)
                    if broadcast is not None and broadcast.tracks:
                        info = FrameInfo(first_index + i, version, seconds, made_at)
                        self.loop.call_soon_threadsafe(broadcast.fan_out, broadcast.encode(frame, info), info)

    def broadcast_for(self, audience) -> Broadcast:
        """The audience's WebRTC encoders (made on first use; on the event loop)."""
        if audience not in self.broadcasts:
            self.broadcasts[audience] = Broadcast(self.fps, choose_encoder())
        return self.broadcasts[audience]

    def forget_broadcast(self, audience) -> None:
        broadcast = self.broadcasts.get(audience)
        if broadcast is not None and not broadcast.tracks:
            del self.broadcasts[audience]

    def _fan_out(self, message: bytes, audience=None) -> None:
        for viewer in self.viewers if audience is None else audience.viewers:
            if viewer.rtc_live:
                continue
            if viewer.frames.full():
                viewer.frames.get_nowait()
                viewer.dropped += 1
                self.viewers_dropped += 1
                if audience is not None:
                    audience.dropped += 1
            viewer.frames.put_nowait(message)


class StreamServer:
    """HTTP + WebSocket front of the service (run on the serving rank, in its own thread).

    One shared stream (`controls` given: every viewer sees it and steers it), or sessions
    (`StreamServer.for_sessions`: each viewer its own, engine/serving/lobby.py). `start()` listens
    at once (before a model loads, so that a port in use fails fast); until `stats` is set to the
    stream's (or replicas are attached to the lobby), viewers see the starting prompt and no frames
    (or are told to retry). `ignored_words(prompt)` lists the words of an accepted prompt the
    model will not use (the ack tells the viewer).
    """

    def __init__(
        self,
        controls: Controls | None,
        stats: Callable[[], dict] | None = None,
        *,
        host: str,
        port: int,
        token: str | None,
        allow_origins: tuple[str, ...] = (),
        ignored_words: Callable[[str], list[str]] = lambda prompt: [],
        webrtc: bool = True,
        ice_servers: tuple[dict, ...] = (),
        fps: int = 16,
        video_in: Callable | None = None,
    ):
        if needs_token(host) and not token:
            raise ValueError(f"binding to {host!r} exposes the stream: pass --token")
        self.controls, self.host, self.port = controls, host, port
        self.stats = stats or (lambda: asdict(Stats(prompt=controls.prompt if controls else "")))
        self.access = AccessPolicy(token, tuple(parse_origin(o) for o in allow_origins))
        self.ignored_words = ignored_words
        if webrtc and AIORTC:
            announce_encoder()
        self.loop = asyncio.new_event_loop()
        self.hub = Hub(self.loop, fps)
        self.rtc = Signalling(self.hub, webrtc and AIORTC, list(ice_servers), lambda: self.lobby, video_in)
        self.lobby: Lobby | None = None
        self.media_limits = MediaLimits(max_bytes=MAX_UPLOAD_BYTES)
        """What an upload may be (sessions only): its file's bytes, frame size and frames."""
        self.ready = threading.Event()
        self.address: tuple[str, int] | None = None
        self._error: BaseException | None = None
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, name="stream-server", daemon=True)

    @classmethod
    def for_sessions(cls, prompt: str, seed: int, **options) -> StreamServer:
        """A server whose viewers each get a session (or join one); attach replicas to `lobby`."""
        server = cls(None, **options)
        server.lobby = Lobby(server.hub.publish, prompt=prompt, seed=seed)
        server.lobby.loop, server.lobby.on_end = server.loop, server._session_ended
        return server

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> StreamServer:
        """Listen; OSError with one line saying what to change if that is not possible."""
        self._thread.start()
        if not self.ready.wait(timeout=30) or self.address is None:
            self.stop()
            reason = _reason(self._error)
            raise OSError(f"cannot serve on {self.host}:{self.port}: {reason}; choose another --port (0: any free one)")
        return self

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def stop(self) -> None:
        if self.lobby is not None:
            self.lobby.stop()
        self.hub.close()
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except Exception as err:  # a taken port, a bad port number or host: start() reports it
            self._error = err
            self.ready.set()

    async def _serve(self) -> None:
        self._stop = self.loop.create_future()
        async with serve(
            self._handle, self.host, self.port, process_request=self._route, max_size=self._max_message_bytes(),
            compression=None, close_timeout=CLOSE_TIMEOUT_S,
        ) as server:  # fmt: skip
            self.address = server.sockets[0].getsockname()[:2]
            self.ready.set()
            await self._stop

    def _max_message_bytes(self) -> int:
        """Over this a message closes the connection (1009). Sessions take uploads: up to twice
        their limit still gets a one-line error (a shared stream keeps CLOSE_ABOVE_BYTES)."""
        if self.lobby is None:
            return CLOSE_ABOVE_BYTES
        return max(CLOSE_ABOVE_BYTES, 2 * (self.media_limits.max_bytes + len(UPLOAD_MAGIC)))

    # -- HTTP ----------------------------------------------------------------------------------

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        refusal = self.access.refusal(request, websocket=path == "/ws")
        if refusal is not None:
            return connection.respond(refusal[0], refusal[1] + "\n")
        if path == "/ws":
            return None if request.method == "GET" else _not_allowed(connection, "GET")  # the handshake goes on
        if path in PAGE_PATHS:
            return _resource(connection, request, PAGE.read_bytes(), "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return _resource(connection, request, FAVICON, "image/svg+xml")
        if path == "/stats":
            return _resource(connection, request, json.dumps(self.server_stats()).encode(), "application/json")
        if path == "/metrics":
            return _resource(connection, request, prometheus(self.server_stats()).encode(), PROMETHEUS_TYPE)
        if path == "/rtc":
            return _resource(connection, request, json.dumps(self.rtc.settings()).encode(), "application/json")
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    def server_stats(self) -> dict:
        """Server-wide numbers (/stats as JSON, /metrics in Prometheus' text format)."""
        hub = self.hub
        counts = {"connections": len(hub.viewers), "frames_dropped_by_viewer_queues_total": hub.viewers_dropped,
                  "frames_dropped_before_encoding_total": hub.encoder_dropped}  # fmt: skip
        if self.lobby is not None:
            return {"mode": "sessions", **counts, **self.lobby.summary()}
        return {"mode": "shared", **counts, **{k: v for k, v in self.stats().items() if k != "prompt"}}

    # -- WebSocket -------------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, VIEWER_SEND_BUFFER)
        viewer = Viewer(connection)
        if len(self.hub.viewers) >= MAX_VIEWERS:
            return await _turn_away(connection, "refused", Refusal("too many viewers", TOO_MANY_RETRY_S).message())
        if self.lobby is not None and not await self._admit(viewer):
            return
        self.hub.viewers.add(viewer)
        tasks = [asyncio.create_task(self._send_frames(viewer)), asyncio.create_task(self._push_stats(viewer))]
        try:
            await self._receive(viewer)
        finally:
            self.hub.viewers.discard(viewer)
            if viewer.session is not None:
                self.lobby.viewer_gone(viewer.session, viewer)
            for task in tasks:
                task.cancel()
            await self.rtc.hang_up(viewer)

    async def _admit(self, viewer: Viewer) -> bool:
        """Give the viewer its session (a new one, or the one `?session=` names); else say why and close."""
        query = parse_qs(urlsplit(viewer.connection.request.path).query)
        try:
            if "session" in query:
                viewer.session = await self.lobby.join(query["session"][0], viewer)
            else:
                accept = (query.get("accept") or ["0"])[0] not in ("", "0", "false")
                viewer.session = await self.lobby.open(viewer, (query.get("ticket") or [None])[0], accept=accept)
        except Refusal as refusal:
            await _turn_away(viewer.connection, "refused", refusal.message())
            return False
        except LookupError as err:
            await _turn_away(viewer.connection, "ended", {"reason": str(err.args[0])}, code=CloseCode.POLICY_VIOLATION)
            return False
        watched = viewer.session
        await viewer.connection.send(
            reply(
                "session",
                id=watched.id,
                share=f"/?session={watched.id}",
                prompt=watched.prompt,
                seed=watched.seed,
                replica=watched.replica.index,
            )
        )
        return True

    def _session_ended(self, watched: Watched, reason: str) -> None:
        for viewer in list(watched.viewers):
            asyncio.ensure_future(_turn_away(viewer.connection, "ended", {"reason": reason}, code=CloseCode.GOING_AWAY))

    async def _send_frames(self, viewer: Viewer) -> None:
        try:
            while True:
                await viewer.connection.send(await viewer.frames.get())
        except ConnectionClosed:
            pass

    async def _push_stats(self, viewer: Viewer) -> None:
        try:
            while True:
                await viewer.connection.send(self._stats_message(viewer))
                await asyncio.sleep(STATS_EVERY_S)
        except ConnectionClosed:
            pass

    def _stats_message(self, viewer: Viewer) -> str:
        """A shared stream's stats and the server's drop counts; or the viewer's session's own."""
        hub, watched = self.hub, viewer.session
        if watched is None:
            return reply("stats", **self.stats(), viewers=len(hub.viewers), you_dropped=viewer.dropped,
                         viewers_dropped=hub.viewers_dropped, encoder_dropped=hub.encoder_dropped,
                         transport=_transport(viewer))  # fmt: skip
        shown = {**watched.summary(), "session": watched.id, "prompt": watched.prompt,
                 "version": watched.stats.get("version", watched.version), "last_switch_s": watched.last_switch_s,
                 "ranks": len(self.lobby.replicas), "you_dropped": viewer.dropped,
                 "session_dropped": watched.dropped, "transport": _transport(viewer)}  # fmt: skip
        return reply("stats", **{"stream_fps": self.lobby.fps, **shown})

    async def _receive(self, viewer: Viewer) -> None:
        try:
            while True:
                # str for a text message, bytes for a binary one (refused: control is JSON text);
                # a text message that is not UTF-8 closes the connection (1007), as RFC 6455 says
                message = await viewer.connection.recv()
                await viewer.connection.send(await self._answer(message, viewer))
        except ConnectionClosed:
            pass

    async def _answer(self, message: str | bytes, viewer: Viewer) -> str:
        if is_upload(message):
            return await self._upload_answer(message, viewer)
        if is_video_in(message):
            return await self._video_in_answer(message, viewer)
        try:
            control = parse_control(message)
        except ProtocolError as err:
            return reply("error", error=str(err))
        if control.type == "stats":
            return self._stats_message(viewer)
        if control.type in SIGNALS:
            return await self.rtc.answer(control, viewer)
        if viewer.session is not None:
            return await self._session_answer(control, viewer.session)
        if control.type == "prompt":
            return self._prompt_ack(self.controls.request_prompt(control.text), control.text)
        self.controls.set_paused(control.type == "pause")
        return reply("ack", of=control.type)

    async def _upload_answer(self, message: bytes, viewer: Viewer) -> str:
        """Restart the viewer's own session from an uploaded image or clip (protocol.py's upload):
        checked here, off the event loop, before any replica sees it; errors go to this viewer."""
        if viewer.session is None:
            return reply("error", error="a shared stream cannot start from an upload (each viewer's session can)")
        try:
            data = upload_file(message, self.media_limits.max_bytes)
            await asyncio.to_thread(load_media, data, self.media_limits)
        except (ProtocolError, MediaError) as err:
            return reply("error", error=str(err))
        answer = await self.lobby.control(viewer.session, "start_from", base64.b64encode(data).decode("ascii"))
        return reply("error", error=answer["error"]) if "error" in answer else reply("ack", of="start", **answer["ok"])

    async def _video_in_answer(self, message: bytes, viewer: Viewer) -> str:
        """The viewer's session restyles an uploaded clip (protocol.py's video-in message): checked
        and decoded here, off the event loop, within the upload limits; errors go to this viewer."""
        if viewer.session is None:
            return reply("error", error="a shared stream cannot take video in (each viewer's session can)")
        try:
            strength, data = video_in_upload(message, self.media_limits.max_bytes)
            media = await asyncio.to_thread(load_media, data, self.media_limits)
        except (ProtocolError, MediaError) as err:
            return reply("error", error=str(err))
        if media.is_image:
            return reply("error", error="video in takes a clip, not an image (an image starts a stream: b'ARCU')")
        answer = await self.lobby.control(viewer.session, "video_in", iter(media.frames), strength)
        if "error" in answer:
            return reply("error", error=answer["error"])
        return reply("ack", of="video_in", frames=len(media.frames), strength=round(strength, 4))

    def _prompt_ack(self, version: int, text: str) -> str:
        """The ack of an accepted prompt: its version, the text as accepted, the words the model ignores."""
        return reply("ack", of="prompt", version=version, text=text, ignored=self.ignored_words(text))

    async def _session_answer(self, control: Control, watched: Watched) -> str:
        """A control that acts on the viewer's own session only."""
        if control.type == "prompt":
            answer = await self.lobby.control(watched, "set_prompt", control.text)
            if "error" in answer:
                return reply("error", error=answer["error"])
            return self._prompt_ack(answer["ok"]["version"], control.text)
        answer = await self.lobby.control(watched, control.type)
        return reply("error", error=answer["error"]) if "error" in answer else reply("ack", of=control.type)


def _transport(viewer: Viewer) -> str:
    return "webrtc" if viewer.rtc_live else "jpeg"


async def _turn_away(connection: ServerConnection, kind: str, fields: dict, code: int = CloseCode.TRY_AGAIN_LATER):
    """Say why in one JSON message, then close: a refused or ended viewer never just hangs."""
    try:
        await connection.send(reply(kind, **fields))
        await connection.close(code, close_reason(fields.get("reason", kind)))
    except ConnectionClosed:
        pass


def _reason(error: BaseException | None) -> str:
    """What went wrong in a few words ("Address already in use", not asyncio's sentence about it)."""
    if error is None:
        return "no answer within 30 s"
    errno = getattr(error, "errno", None)
    return os.strerror(errno) if isinstance(errno, int) and errno > 0 else str(error)


def _resource(connection: ServerConnection, request: Request, body: bytes, kind: str) -> Response:
    """GET: the body; HEAD: the same headers, no body; anything else: 405."""
    if request.method not in ("GET", "HEAD"):
        return _not_allowed(connection, "GET, HEAD")
    headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                       ("Connection", "close")])  # fmt: skip
    return Response(HTTPStatus.OK, "OK", headers, body if request.method == "GET" else b"")


def _not_allowed(connection: ServerConnection, allow: str) -> Response:
    response = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, f"only {allow} here\n")
    response.headers["Allow"] = allow
    return response
