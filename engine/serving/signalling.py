"""WebRTC signalling for the stream server: offers, ICE candidates and hangups on a viewer's WebSocket.

Each viewer may hold one peer connection (engine/serving/webrtc.py `Peer`); a new offer replaces
it. Everything here acts on the viewer's own stream only: an offer naming another session is
refused. A refusal is one line to that viewer (`{"type": "error", ...}`) and changes nothing
else. A camera track plugs into the viewer's session as a bounded `FrameFeed` (CAMERA_QUEUE
frames, the oldest dropped and counted); a shared stream takes no camera.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from engine.media.feed import FrameFeed
from engine.serving.protocol import Control, reply
from engine.serving.webrtc import AIORTC, Peer, SignalError, choose_encoder

CAMERA_QUEUE = 8  # camera frames waiting for the engine before the oldest is dropped
CAMERA_STRENGTH = 0.6  # how far a camera's frames are noised when the offer does not say


class Signalling:
    """`answer(control, viewer)` for the server's offer/ice/hangup messages; `hang_up(viewer)` when
    its connection ends. `video_in(viewer, strength)` (default: the viewer's session's feed) is
    the input a viewer's camera pushes into; it may be awaited."""

    def __init__(self, hub, enabled: bool, ice_servers: list[dict], lobby: Callable, video_in: Callable | None = None):
        self.hub, self.enabled, self.ice_servers, self.lobby = hub, enabled, ice_servers, lobby
        self.video_in = video_in or self.camera_feed

    def settings(self) -> dict:
        """What the page needs before it offers (GET /rtc): whether to try WebRTC, the ICE servers."""
        if not self.enabled:
            why = "this server runs without aiortc" if not AIORTC else "WebRTC is off on this server"
            return {"webrtc": False, "reason": why}
        return {"webrtc": True, "ice_servers": self.ice_servers, "codec": choose_encoder().mime}

    async def answer(self, control: Control, viewer) -> str:
        """An offer, an ICE candidate or a hangup from this viewer, for its own stream only."""
        if not self.enabled:
            return reply("error", error=f"no WebRTC here ({self.settings()['reason']}): frames come as JPEG on "
                                        "this WebSocket")  # fmt: skip
        own = viewer.session.id if viewer.session is not None else None
        if control.session is not None and control.session != own:
            watched = f"session {own!r}" if own else "the shared stream"
            return reply("error", error=f"an offer for session {control.session[:40]!r} is refused: this connection "
                                        f"watches {watched}")  # fmt: skip
        try:
            if control.type == "offer":
                return await self._offer(control, viewer)
            if viewer.peer is None and control.type == "ice":
                return reply("error", error="no WebRTC connection: send an offer first")
            if control.type == "ice":
                await viewer.peer.candidate(control.candidate)
                return reply("ack", of="ice")
        except SignalError as err:  # a refused offer ends the connection it made; a bad candidate does not
            if control.type == "offer":
                await self.hang_up(viewer)
            return reply("error", error=str(err))
        await self.hang_up(viewer)
        return reply("ack", of="hangup")

    async def _offer(self, control: Control, viewer) -> str:
        await self.hang_up(viewer)  # a new offer replaces the viewer's connection (e.g. to add its camera)
        audience, strength = viewer.session, control.strength or CAMERA_STRENGTH
        send = lambda message: asyncio.ensure_future(_send_quietly(viewer.connection, json.dumps(message)))  # noqa: E731
        camera = lambda: self.video_in(viewer, strength)  # noqa: E731
        viewer.peer = Peer(self.hub.broadcast_for(audience), self.ice_servers, send, camera,
                           lambda live: setattr(viewer, "rtc_live", live))  # fmt: skip
        answer, mime = await viewer.peer.answer(control.text)
        return reply("answer", sdp=answer, codec=mime)

    async def camera_feed(self, viewer, strength: float):
        """The viewer's session takes its camera from now on (a bounded feed, oldest frames dropped)."""
        if viewer.session is None:
            raise SignalError("a shared stream takes no camera (each viewer's session can): its track is ignored")
        feed = FrameFeed(capacity=CAMERA_QUEUE)
        answer = await self.lobby().control(viewer.session, "video_in", feed, strength)
        if "error" in answer:
            raise SignalError(f"the camera is not taken: {answer['error']}")
        return feed

    async def hang_up(self, viewer) -> None:
        peer, viewer.peer = viewer.peer, None
        if peer is not None:
            await peer.close()
            self.hub.forget_broadcast(viewer.session)


async def _send_quietly(connection: ServerConnection, text: str) -> None:
    try:
        await connection.send(text)
    except ConnectionClosed:
        pass
