"""Serving one stream to viewers: the page at `/`, frames and control over a WebSocket at `/ws`.

The engine never waits on a viewer. Frames go from the generation thread into a bounded queue;
an encoder thread turns them into JPEG frame messages (engine/protocol.py) and hands each to every
viewer's own bounded queue on the event loop. A queue that is full drops its oldest frame and
counts the drop, so a viewer that reads slowly, or not at all, loses frames and slows no one.

Access: the server binds to 127.0.0.1 unless told otherwise; binding elsewhere needs a token,
which the page and the WebSocket then require as `?token=...`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import queue
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.serving.live import Controls
from engine.serving.protocol import MAX_MESSAGE_BYTES, ProtocolError, encode_frame, parse_control, reply

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("viewer.html")
VIEWER_QUEUE = 48  # frames a viewer may fall behind before its oldest ones are dropped
ENCODER_QUEUE = 8  # blocks waiting for JPEG encoding before the oldest is dropped
STATS_EVERY_S = 1.0
CLOSE_ABOVE_BYTES = 16 * MAX_MESSAGE_BYTES
"""Messages over MAX_MESSAGE_BYTES get an error reply; over this, the connection is closed (1009)."""


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
            viewer.frames.put_nowait(message)


class StreamServer:
    """HTTP + WebSocket front of one stream (run on the serving rank, in its own thread)."""

    def __init__(self, controls: Controls, stats, *, host: str, port: int, token: str | None):
        if needs_token(host) and not token:
            raise ValueError(f"binding to {host!r} exposes the stream: pass --token")
        self.controls, self.stats, self.host, self.port, self.token = controls, stats, host, port, token
        self.loop = asyncio.new_event_loop()
        self.hub = Hub(self.loop)
        self.ready = threading.Event()
        self.address: tuple[str, int] | None = None
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, name="stream-server", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> StreamServer:
        self._thread.start()
        if not self.ready.wait(timeout=30) or self.address is None:
            raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.hub.close()
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except OSError as err:
            log.error("cannot serve on %s:%s: %s", self.host, self.port, err)
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

    def _authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        given = parse_qs(urlparse(request.path).query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlparse(request.path).path
        if not self._authorized(request):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid ?token= is required\n")
        if path == "/ws":
            return None  # go on with the WebSocket handshake
        if path in ("/", "/index.html"):
            body = PAGE.read_bytes()
            headers = Headers([("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                               ("Cache-Control", "no-store")])  # fmt: skip
            return Response(HTTPStatus.OK, "OK", headers, body)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    # -- WebSocket -------------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
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
        return reply("stats", **self.stats(), viewers=len(self.hub.viewers), you_dropped=viewer.dropped,
                     encoder_dropped=self.hub.encoder_dropped)  # fmt: skip

    async def _receive(self, viewer: Viewer) -> None:
        try:
            while True:
                # raw bytes even for text frames: bad UTF-8 gets an error reply, not a closed socket
                message = await viewer.connection.recv(decode=False)
                await viewer.connection.send(self._answer(message, viewer))
        except ConnectionClosed:
            pass

    def _answer(self, message: str | bytes, viewer: Viewer) -> str:
        try:
            control = parse_control(message)
        except ProtocolError as err:
            return reply("error", error=str(err))
        if control.type == "prompt":
            return reply("ack", of="prompt", version=self.controls.request_prompt(control.text), text=control.text)
        if control.type in ("pause", "resume"):
            self.controls.set_paused(control.type == "pause")
            return reply("ack", of=control.type)
        return self._stats_message(viewer)
