"""WebRTC out to viewers (and a viewer's camera in), negotiated over the viewer's WebSocket.

    offer (page) -> answer (server), ICE candidates both ways: JSON control messages
    (engine/serving/protocol.py); the frames then travel as RTP, VP8 or H.264.

Rules:
* Encode once per audience. A session's frames (or the shared stream's) are encoded once per
  codec in use, on the hub's encoder thread; every viewer's track relays the same packets
  (`Broadcast`). A viewer that joins, or whose track fell behind, waits for the next keyframe,
  which its arrival asks for; a keyframe also comes every second.
* A track never queues without bound: a track RELAY_QUEUE packets behind drops what it holds
  (counted) and waits for the next keyframe, like the JPEG path's viewer queue.
* The encoder is chosen once per process (`choose_encoder`) and printed: H.264 from h264_nvenc
  where the GPU and this PyAV build have it, else from libx264 in software. A page that offers no
  H.264 gets VP8 (libvpx, slower and larger at the same quality on this CPU).
* Each frame's index and prompt version reach the page in a `frame` message on the WebSocket
  that names the frame's RTP timestamp as the page will see it (`requestVideoFrameCallback`
  metadata). aiortc draws each sender's RTP timestamp origin at random and keeps it private;
  the track reads it back from the sender after its first frame (`RelayTrack._rtp_of`).
* Without aiortc (`AIORTC` False) nothing here is used and viewers get JPEG over the WebSocket.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

try:
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
    from aiortc.sdp import candidate_from_sdp

    AIORTC = True
except ImportError:  # the page falls back to JPEG over the WebSocket
    AIORTC = False
    MediaStreamTrack = object

RTP_CLOCK = 90_000  # RTP's video clock rate (Hz)
RELAY_QUEUE = 32
"""Packets a viewer's track may fall behind before it drops them and waits for a keyframe."""
ICE_SERVER = re.compile(r"^(stuns?|turns?):(?:([^:@\s]+):([^@\s]+)@)?([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])"
                        r"(?::(\d{1,5}))?(?:\?transport=(udp|tcp))?$")  # fmt: skip
SOFTWARE_QUALITY = {"crf": "18"}
"""libx264's constant quality: the level that matched JPEG quality 85's PSNR or beat it on the
benchmark's clips (python -m launch.bench transport)."""
VP8_QUALITY = {"crf": "8", "b": "6M"}  # libvpx's constrained quality, likewise


class SignalError(ValueError):
    """A signalling message that is refused (its text is the viewer's one-line error)."""


# -- choosing the encoder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderChoice:
    codec: str
    """PyAV's encoder: h264_nvenc or libx264."""
    mime: str
    """What the peers negotiate: video/H264."""
    why: str

    def describe(self) -> str:
        return f"video encoder: {self.codec} ({self.mime.split('/')[1]}) - {self.why}"


@functools.lru_cache(maxsize=1)
def choose_encoder() -> EncoderChoice:
    """NVENC where a frame encodes with it (a GPU with its driver), else libx264 in software."""
    try:
        _encode_one("h264_nvenc")
    except Exception:  # no libcuda, no GPU, a PyAV build without it: all end here
        return EncoderChoice("libx264", "video/H264", "software; h264_nvenc did not open (no NVIDIA GPU or driver)")
    return EncoderChoice("h264_nvenc", "video/H264", "the GPU's encoder")


def _encode_one(codec: str) -> None:
    encoder = FrameEncoder(codec, fps=16)
    encoder.encode(np.zeros((256, 256, 3), np.uint8), 0, keyframe=True)


def announce_encoder() -> EncoderChoice:
    """Choose once and say which, on stderr (like the attention backend)."""
    choice = choose_encoder()
    print(f"note: {choice.describe()}", file=sys.stderr, flush=True)
    return choice


class FrameEncoder:
    """uint8 `[H, W, 3]` frames -> PyAV packets (pts in RTP clock ticks), one codec context."""

    def __init__(self, codec: str, fps: int, options: dict | None = None):
        self.codec, self.fps, self.options = codec, fps, options
        self.context = None

    def _open(self, width: int, height: int):
        import av

        context = av.CodecContext.create(self.codec, "w")
        context.width, context.height, context.pix_fmt = width, height, "yuv420p"
        context.time_base = Fraction(1, RTP_CLOCK)
        context.framerate = Fraction(self.fps, 1)
        context.gop_size = self.fps  # a keyframe every second: late joiners and lost packets recover
        context.max_b_frames = 0
        if self.codec == "libvpx":
            context.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "error-resilient": "1",
                               **(self.options or VP8_QUALITY)}  # fmt: skip
        elif self.codec == "h264_nvenc":  # constant QP 20: about libx264's crf 18 (not measured here: no GPU)
            context.options = {"preset": "p1", "tune": "ull", "zerolatency": "1", "profile": "baseline",
                               "rc": "constqp", "qp": "20", **(self.options or {})}  # fmt: skip
        else:  # libx264; baseline: what every browser's WebRTC decodes (profile-level-id 42e01f)
            context.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                               **(self.options or SOFTWARE_QUALITY)}  # fmt: skip
        return context

    def encode(self, frame: np.ndarray, index: int, keyframe: bool = False) -> list:
        """Packets for one frame (pts = its time on the RTP clock; usually exactly one packet)."""
        import av

        height, width = frame.shape[:2]
        if height % 2 or width % 2:  # 4:2:0 needs even sizes: the last row or column is repeated
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            height, width = frame.shape[:2]
        if self.context is None or (self.context.width, self.context.height) != (width, height):
            self.context = self._open(width, height)
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")  # swscale, BT.601
        picture.pts, picture.time_base = rtp_ticks(index, self.fps), Fraction(1, RTP_CLOCK)
        if keyframe:
            picture.pict_type = av.video.frame.PictureType.I
        packets = list(self.context.encode(picture))
        for packet in packets:
            packet.time_base = Fraction(1, RTP_CLOCK)
        return packets


def rtp_ticks(index: int, fps: int) -> int:
    """Frame `index`'s time on the RTP clock."""
    return round(index * RTP_CLOCK / fps)


# -- one audience's encoders, relayed to its viewers' tracks --------------------------------------


@dataclass(frozen=True)
class FrameInfo:
    index: int
    version: int
    timestamp: float
    made_at: float
    """Wall-clock time (time.time()) the frame was handed to the server: glass-to-glass's start."""


class Broadcast:
    """One audience's encoders (one per codec in use) and the tracks that relay their packets."""

    def __init__(self, fps: int, choice: EncoderChoice):
        self.fps, self.choice = fps, choice
        self.tracks: set[RelayTrack] = set()
        self._encoders: dict[str, FrameEncoder] = {}
        self._want_key: set[str] = set()  # codecs whose next frame must be a keyframe
        self.encoded_frames, self.encode_s = 0, 0.0

    def codec_for(self, mime: str) -> str:
        return self.choice.codec if mime == self.choice.mime else {"video/VP8": "libvpx", "video/H264": "libx264"}[mime]

    def want_keyframe(self, mime: str) -> None:
        self._want_key.add(mime)

    def encode(self, frame: np.ndarray, info: FrameInfo) -> dict[str, list]:
        """On the encoder thread: this frame's packets for every codec a track wants."""
        out = {}
        for mime in {track.mime for track in list(self.tracks)}:
            encoder = self._encoders.setdefault(mime, FrameEncoder(self.codec_for(mime), self.fps))
            keyframe = mime in self._want_key
            self._want_key.discard(mime)
            start = time.process_time()
            out[mime] = encoder.encode(frame, info.index, keyframe=keyframe)
            self.encode_s += time.process_time() - start
        self.encoded_frames += 1
        return out

    def fan_out(self, packets: dict[str, list], info: FrameInfo) -> None:
        """On the event loop: each track gets its codec's packets."""
        for track in list(self.tracks):
            for packet in packets.get(track.mime, ()):
                track.offer(packet, info)


class RelayTrack(MediaStreamTrack):
    """A viewer's video track: the audience's packets, from a keyframe on, never queued unbounded."""

    kind = "video"

    def __init__(self, broadcast: Broadcast, mime: str, on_frame: Callable[[FrameInfo, int | None], None]):
        super().__init__()
        self.broadcast, self.mime, self.on_frame = broadcast, mime, on_frame
        self.sender = None
        self.dropped = 0
        self.sent = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting_key = True
        self._origin: int | None = None
        self._last: tuple[int, FrameInfo] | None = None  # the last frame handed to the sender: (pts, info)
        broadcast.tracks.add(self)
        broadcast.want_keyframe(mime)

    def offer(self, packet, info: FrameInfo) -> None:
        if self._waiting_key and not packet.is_keyframe:
            return
        self._waiting_key = False
        if self._queue.qsize() >= RELAY_QUEUE:  # fallen behind: what it holds is stale
            self.dropped += self._queue.qsize()
            self._queue = asyncio.Queue()
            self._waiting_key = not packet.is_keyframe
            self.broadcast.want_keyframe(self.mime)
            if self._waiting_key:
                return
        self._queue.put_nowait((packet, info))

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        packet, info = await self._queue.get()
        if self._origin is None and self._learn_origin():  # the first frame's info again, now with its RTP time
            self.on_frame(self._last[1], self._rtp_of(self._last[0]))
        self.on_frame(info, self._rtp_of(packet.pts))
        self._last = (packet.pts, info)
        self.sent += 1
        return packet

    def _learn_origin(self) -> bool:
        """Read the sender's random RTP origin back from its last packet (none until one has gone)."""
        if self._last is None or self.sender is None:
            return False
        last = getattr(self.sender, "_RTCRtpSender__rtp_timestamp", None)
        if last:
            self._origin = (last - self._last[0]) % 2**32
        return self._origin is not None

    def _rtp_of(self, pts: int) -> int | None:
        """The RTP timestamp the page will see for `pts` (None while the origin is unknown)."""
        return None if self._origin is None else (self._origin + pts) % 2**32

    def stop(self) -> None:
        self.broadcast.tracks.discard(self)
        super().stop()


# -- one viewer's peer connection -----------------------------------------------------------------


def parse_ice_server(text: str) -> dict:
    """`stun:host[:port]` or `turn:USER:PASS@host[:port][?transport=udp|tcp]` -> RTCIceServer fields."""
    match = ICE_SERVER.match(text.strip())
    if match is None or (match[5] and not 0 < int(match[5]) < 65536):
        raise ValueError(f"{text!r} is not an ICE server: give stun:HOST[:PORT] or turn:USER:PASS@HOST[:PORT]")
    scheme, user, password, host, port, transport = match.groups()
    if scheme.startswith("turn") and not user:
        raise ValueError(f"{text!r}: a TURN server needs credentials: turn:USER:PASS@HOST[:PORT]")
    url = f"{scheme}:{host}" + (f":{port}" if port else "") + (f"?transport={transport}" if transport else "")
    return {"urls": url, **({"username": user, "credential": password} if user else {})}


class Peer:
    """One viewer's peer connection: our track out, maybe its camera in.

    `send(text)` speaks to the viewer's WebSocket; `feed()` is the viewer's session's input
    (None: this stream takes no video); `on_state(live)` says when the track starts or stops
    carrying the viewer's frames (the server stops or resumes JPEG for it).
    """

    def __init__(self, broadcast: Broadcast, ice_servers: list[dict], send: Callable, feed: Callable,
                 on_state: Callable[[bool], None]):  # fmt: skip
        self.broadcast, self.send, self.feed, self.on_state = broadcast, send, feed, on_state
        config = RTCConfiguration([RTCIceServer(**server) for server in ice_servers])
        self.pc = RTCPeerConnection(config)
        self.track: RelayTrack | None = None
        self.live = False
        self._camera: asyncio.Task | None = None
        self._answered = asyncio.Event()  # a camera is taken (and said so) after the answer has gone
        self.pc.on("connectionstatechange", self._state_changed)
        self.pc.on("track", self._incoming)

    async def answer(self, sdp: str) -> tuple[str, str]:
        """The answer to the viewer's offer, and the codec it carries; SignalError if refused."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as err:
            raise SignalError(f"malformed offer: {_first_line(err)}") from None
        videos = [t for t in self.pc.getTransceivers() if t.kind == "video"]
        if not videos:
            raise SignalError("the offer has no video: add a recvonly (or sendrecv) video transceiver")
        mime = self._codec(videos[0])
        self.track = RelayTrack(self.broadcast, mime, self._frame_sent)
        self.track.sender = self.pc.addTrack(self.track)  # takes the offer's video transceiver, now sending
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as err:
            raise SignalError(f"cannot answer this offer: {_first_line(err)}") from None
        asyncio.get_running_loop().call_soon(self._answered.set)  # after the caller sends the answer
        return self.pc.localDescription.sdp, mime

    def _codec(self, transceiver) -> str:
        """Prefer the chosen encoder's codec, else the other of VP8 and H.264 the page offers (the
        sender sends the first of the negotiated codecs)."""
        codecs = transceiver._codecs
        offered = [c.mimeType for c in codecs if c.mimeType in ("video/VP8", "video/H264")]
        if not offered:
            raise SignalError("the offer carries neither VP8 nor H.264")
        mime = self.broadcast.choice.mime if self.broadcast.choice.mime in offered else offered[0]
        transceiver._codecs = [c for c in codecs if c.mimeType == mime] + [c for c in codecs if c.mimeType != mime]
        return mime

    async def candidate(self, data: dict | None) -> None:
        """A trickled ICE candidate from the page (None: the page has no more)."""
        if data is None or not data.get("candidate"):
            return
        text = data["candidate"]
        try:
            candidate = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        except Exception:
            raise SignalError("malformed ICE candidate") from None
        candidate.sdpMid, candidate.sdpMLineIndex = data.get("sdpMid"), data.get("sdpMLineIndex")
        try:
            await self.pc.addIceCandidate(candidate)
        except Exception as err:
            raise SignalError(f"ICE candidate refused: {_first_line(err)}") from None

    def _frame_sent(self, info: FrameInfo, rtp: int | None) -> None:
        if not self.live:
            self.live = True
            self.on_state(True)
        self.send({"type": "frame", "index": info.index, "version": info.version, "timestamp": info.timestamp,
                   "rtp": rtp})  # fmt: skip

    async def _state_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed") and self.live:
            self.live = False
            self.on_state(False)
        if self.pc.connectionState == "failed":
            self.send({"type": "webrtc", "state": "failed", "fallback": "jpeg"})

    def _incoming(self, track) -> None:
        if track.kind != "video":
            self.send({"type": "error", "error": f"only a video track (a camera) is taken, not {track.kind}"})
            return
        self._camera = asyncio.ensure_future(self._take_camera(track))

    async def _take_camera(self, track) -> None:
        """Plug the camera into the viewer's stream; a refusal is one line to the viewer."""
        await self._answered.wait()
        try:
            feed = self.feed()
            feed = await feed if inspect.isawaitable(feed) else feed
        except SignalError as err:
            self.send({"type": "error", "error": str(err)})
            return
        self.send({"type": "ack", "of": "camera"})
        await _pump(track, feed)

    async def close(self) -> None:
        if self._camera is not None:
            self._camera.cancel()
        if self.track is not None:
            self.track.stop()
        if self.live:
            self.live = False
            self.on_state(False)
        await self.pc.close()


async def _pump(track, feed) -> None:
    """The viewer's camera frames into its session's feed; a camera that stops ends the input."""
    try:
        while True:
            frame = await track.recv()
            feed.push(frame.to_ndarray(format="rgb24"))
    except (MediaStreamError, asyncio.CancelledError):
        pass
    finally:
        feed.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:160] if text else type(err).__name__) or type(err).__name__
