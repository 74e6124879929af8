"""The script client's WebRTC receiver: the server's video track in, frames out with their info.

`RtcReceiver.start(client)` offers a receive-only video connection over the client's WebSocket
(aiortc gathers its candidates before the offer leaves, so nothing trickles) and hands every
decoded frame to the client as a `Frame` (engine/serving/protocol.py) with `pixels` set. A
frame's index, timestamp and prompt version come from the server's `frame` messages, matched by
RTP timestamp; aiortc's receiver counts a decoded frame's pts from the first RTP timestamp it
received, and keeps that origin private (`_rtp_of` reads it back). A frame whose message never
comes within MATCH_WAIT_S is skipped. Without aiortc, or if the connection fails, `auto` stays on JPEG.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from engine.serving.protocol import Frame
from engine.serving.webrtc import AIORTC

TRANSPORTS = ("auto", "webrtc", "jpeg")
MATCH_WAIT_S = 0.5
KEPT_INFO = 512  # frame messages remembered, for frames still in the jitter buffer


class RtcReceiver:
    def __init__(self, client):
        from aiortc import RTCPeerConnection

        self.client = client
        self.pc = RTCPeerConnection()
        self.info: OrderedDict[int, dict] = OrderedDict()
        self.failed = False
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    async def start(cls, client, required: bool) -> None:
        """Negotiate; on failure stay on JPEG, or (required) raise RuntimeError in one line."""
        if not AIORTC:
            if required:
                raise RuntimeError("--transport webrtc needs aiortc: pip install aiortc")
            return
        receiver = client.rtc = cls(client)
        try:
            await receiver._negotiate()
        except Exception as err:
            await receiver.close()
            client.rtc = None
            if required:
                raise RuntimeError(f"WebRTC failed: {err}") from None

    async def _negotiate(self) -> None:
        from aiortc import RTCSessionDescription

        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.on("track", lambda track: self._read_soon(track))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await self.client.request({"type": "offer", "sdp": self.pc.localDescription.sdp})
        if answer.get("type") != "answer":
            raise RuntimeError(answer.get("error", f"no answer: {answer}"))
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    def _read_soon(self, track) -> None:
        if track.kind == "video":
            self._task = asyncio.ensure_future(self._read(track))

    def note(self, message: dict) -> None:
        """A server message about the track: a frame's info, or that the connection failed."""
        if message.get("type") == "webrtc":
            self.failed = message.get("state") == "failed"
        elif message.get("rtp") is not None:
            self.info[message["rtp"]] = message
            while len(self.info) > KEPT_INFO:
                self.info.popitem(last=False)
            self._arrived.set()

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                picture = await track.recv()  # pts: RTP time since the first packet
                info = await self._info_for(self._rtp_of(picture.pts))
                if info is None:
                    continue
                self.client.transport = "webrtc"
                pixels = picture.to_ndarray(format="rgb24")
                await self.client.deliver(Frame(info["index"], info["timestamp"], info["version"], b"", pixels))
        except MediaStreamError:
            pass

    def _rtp_of(self, pts: int) -> int:
        receivers = self.pc.getReceivers()
        mapper = getattr(receivers[0], "_RTCRtpReceiver__timestamp_mapper", None) if receivers else None
        origin = getattr(mapper, "_origin", None) or 0
        return (origin + pts) % 2**32

    async def _info_for(self, rtp: int) -> dict | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MATCH_WAIT_S
        while rtp not in self.info and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except TimeoutError:
                break
        return self.info.get(rtp)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.pc.close()
