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
import ipaddress
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.serving.access import AccessPolicy, parse_origin
from engine.serving.controls import Controls
from engine.serving.live import Stats
from engine.serving.protocol import MAX_MESSAGE_BYTES, ProtocolError, encode_frame, parse_control, reply

PAGE = Path(__file__).with_name("viewer.html")
VIEWER_QUEUE = 48  # frames a viewer may fall behind before its oldest ones are dropped
VIEWER_SEND_BUFFER = 128 * 1024
"""Kernel send buffer per viewer (Linux doubles it). Left to autotuning it grows to tcp_wmem's
maximum (4 MiB by default) for a viewer that stops reading: memory per connection, and thousands
of stale frames held before the viewer's own queue, which drops the oldest, comes into play."""
ENCODER_QUEUE = 8  # blocks waiting for JPEG encoding before the oldest is dropped
STATS_EVERY_S = 1.0
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


class Hub:
    """Frames in from the engine (any thread), out to every viewer, never blocking the engine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.viewers: set[Viewer] = set()
        self.encoder_dropped = 0
        self.viewers_dropped = 0  # by every viewer's queue, since the start
        self._blocks: queue.Queue = queue.Queue(ENCODER_QUEUE)
        self._thread = threading.Thread(target=self._encode_forever, name="frame-encoder", daemon=True)
        self._thread.start()

    def publish(self, frames: np.ndarray, first_index: int, version: int, seconds: float) -> None:
        """Called by the engine with each finished block's frames `[N, H, W, 3]` uint8."""
        item = (frames, first_index, version, seconds)
        while True:
            try:
                self._blocks.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._blocks.get_nowait()
                    self.encoder_dropped += len(frames)
                except queue.Empty:
                    pass

    def close(self) -> None:
        self._blocks.put(None)

    def _encode_forever(self) -> None:
        while (item := self._blocks.get()) is not None:
            frames, first_index, version, seconds = item
            for i, frame in enumerate(frames):
                message = encode_frame(first_index + i, seconds, version, frame)
                self.loop.call_soon_threadsafe(self._fan_out, message)

    def _fan_out(self, message: bytes) -> None:
        for viewer in self.viewers:
            if viewer.frames.full():
                viewer.frames.get_nowait()
                viewer.dropped += 1
                self.viewers_dropped += 1
            viewer.frames.put_nowait(message)


class StreamServer:
    """HTTP + WebSocket front of one stream (run on the serving rank, in its own thread).

    `start()` listens at once (before a model loads, so that a port in use fails fast); until
    `stats` is set to the stream's, viewers see the starting prompt and no frames.
    `ignored_words(prompt)` lists the words of an accepted prompt the model will not use (the ack
    tells the viewer).
    """

    def __init__(
        self,
        controls: Controls,
        stats: Callable[[], dict] | None = None,
        *,
        host: str,
        port: int,
        token: str | None,
        allow_origins: tuple[str, ...] = (),
        ignored_words: Callable[[str], list[str]] = lambda prompt: [],
    ):
        if needs_token(host) and not token:
            raise ValueError(f"binding to {host!r} exposes the stream: pass --token")
        self.controls, self.host, self.port = controls, host, port
        self.stats = stats or (lambda: asdict(Stats(prompt=controls.prompt)))
        self.access = AccessPolicy(token, tuple(parse_origin(o) for o in allow_origins))
        self.ignored_words = ignored_words
        self.loop = asyncio.new_event_loop()
        self.hub = Hub(self.loop)
        self.ready = threading.Event()
        self.address: tuple[str, int] | None = None
        self._error: BaseException | None = None
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, name="stream-server", daemon=True)

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
            self._handle, self.host, self.port, process_request=self._route, max_size=CLOSE_ABOVE_BYTES,
            compression=None,
        ) as server:  # fmt: skip
            self.address = server.sockets[0].getsockname()[:2]
            self.ready.set()
            await self._stop

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
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    # -- WebSocket -------------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, VIEWER_SEND_BUFFER)
        viewer = Viewer(connection)
        self.hub.viewers.add(viewer)
        tasks = [asyncio.create_task(self._send_frames(viewer)), asyncio.create_task(self._push_stats(viewer))]
        try:
            await self._receive(viewer)
        finally:
            self.hub.viewers.discard(viewer)
            for task in tasks:
                task.cancel()

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
        hub = self.hub
        return reply("stats", **self.stats(), viewers=len(hub.viewers), you_dropped=viewer.dropped,
                     viewers_dropped=hub.viewers_dropped, encoder_dropped=hub.encoder_dropped)  # fmt: skip

    async def _receive(self, viewer: Viewer) -> None:
        try:
            while True:
                # str for a text message, bytes for a binary one (refused: control is JSON text);
                # a text message that is not UTF-8 closes the connection (1007), as RFC 6455 says
                message = await viewer.connection.recv()
                await viewer.connection.send(self._answer(message, viewer))
        except ConnectionClosed:
            pass

    def _answer(self, message: str | bytes, viewer: Viewer) -> str:
        try:
            control = parse_control(message)
            if control.type == "prompt":
                version = self.controls.request_prompt(control.text)
                return reply("ack", of="prompt", version=version, text=control.text,
                             ignored=self.ignored_words(control.text))  # fmt: skip
        except ProtocolError as err:
            return reply("error", error=str(err))
        if control.type in ("pause", "resume"):
            self.controls.set_paused(control.type == "pause")
            return reply("ack", of=control.type)
        return self._stats_message(viewer)


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
