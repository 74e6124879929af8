"""The viewer protocol: binary frame messages out, JSON control messages both ways.

Frame (server -> viewer), one WebSocket binary message per video frame:

    offset  size  field
    0       4     magic b"ARC1"
    4       4     frame index, uint32 little-endian (0, 1, 2, ... in stream order)
    8       8     timestamp, float64 little-endian: seconds since the stream started
    16      4     prompt version, uint32 little-endian (which accepted prompt shaped this frame)
    20      -     the frame as a JPEG image

Control (viewer -> server), one JSON object per text message, at most MAX_MESSAGE_BYTES of UTF-8
(longer ones get an error; over 16 times that, the server closes the connection with code 1009):

    {"type": "prompt", "text": "a red circle moving left"}
        -> {"type": "ack", "of": "prompt", "version": 3, "text": "...", "ignored": ["words", ...]}
    {"type": "pause"} / {"type": "resume"}                   -> {"type": "ack", "of": "pause"}
    {"type": "stats"}                                        -> {"type": "stats", ...}

Anything else - a binary message, not JSON, not an object, an unknown type, a missing or bad
prompt - is answered with {"type": "error", "error": "..."} and changes nothing. A prompt is
accepted if `clean_prompt` accepts it: that one function is also what the engine's control packet
is sized by (engine/serving/live.py), so every accepted prompt reaches every rank intact.
The server also pushes {"type": "stats", ...} about once a second.

Sessions (the default; `--shared-stream` gives every viewer one stream): on connecting, a viewer
gets {"type": "session", "id": ..., "share": "/?session=ID", ...} and its controls act on that
session only; `/ws?session=ID` joins (or, after a dropped connection, resumes) a session. A
viewer the server cannot take gets {"type": "refused", "reason": ..., "retry_after_s": ...,
"queue_position": ..., "ticket": ..., "offer_fps": ...} and the connection closes (1013, its
close reason the message's reason shortened to the 123 bytes a close frame holds). `offer_fps`,
when not null, is the frame rate the viewer would get if admitted now anyway: it takes it by
connecting again with `/ws?accept=1` (and its ticket). A session that ends (its replica failed,
no viewer for longer than the grace period) sends {"type": "ended", "reason": ...} and closes.
Server-wide stats: `GET /stats` (JSON) and `GET /metrics` (Prometheus text format, `prometheus`).

Start from pixels (sessions only): one binary message, UPLOAD_MAGIC (b"ARCU") followed by an
image or clip file of at most MAX_UPLOAD_BYTES, restarts the viewer's session from it (its frames
become the stream's first blocks, engine/serving/sessions.py `start_from`). The type is read from
the content, never a name; the answer is {"type": "ack", "of": "start", "blocks": N} or one
{"type": "error", ...} to that viewer only (too large, another type, corrupt, a shared stream).

Video in from a clip (sessions only): one binary message, VIDEO_IN_MAGIC (b"ARCV"), the strength
as a float32 little-endian in (0, 1], then a clip file under the same limits and checks as an
upload. From its next block the viewer's session restyles the clip under its prompt (each block
starts from the clip's next frames noised to the strength), then goes on from the prompt once the
clip ends. The answer is {"type": "ack", "of": "video_in", "frames": N, "strength": S} or one error.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.media import MediaError, sniff

MAGIC = b"ARC1"
HEADER = struct.Struct("<4sIdI")  # magic, frame index, timestamp, prompt version
MAX_MESSAGE_BYTES = 4096
MAX_OFFER_BYTES = 32 * 1024
"""A WebRTC offer's message may be this long (a browser's SDP runs to several KiB)."""
MAX_CLOSE_REASON_BYTES = 123
"""A WebSocket close frame's reason: 125 bytes of payload less the 2-byte code (RFC 6455 5.5)."""
MAX_PROMPT_BYTES = 2000
"""A prompt's limit in UTF-8 bytes (2000 ASCII characters, or 500 emoji): what ranks exchange."""
JPEG_QUALITY = 85
CONTROL_TYPES = ("prompt", "pause", "resume", "stats", "offer", "ice", "hangup")
SIGNALS = ("offer", "ice", "hangup")
"""WebRTC signalling (engine/serving/webrtc.py); the rest steer the stream."""
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRIC_LISTS = {"replicas": "replica", "per_session": "session"}
"""Lists of records in the server's stats -> the label that tells their metrics apart."""


class ProtocolError(ValueError):
    """A control message that is refused (the text becomes the error reply)."""


@dataclass(frozen=True)
class Frame:
    index: int
    timestamp: float
    prompt_version: int
    jpeg: bytes
    pixels: np.ndarray | None = None
    """A frame that came over WebRTC: decoded already (`jpeg` is then empty)."""

    def image(self) -> np.ndarray:
        """`[H, W, 3]` uint8."""
        if self.pixels is not None:
            return self.pixels
        return np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))


def encode_frame(index: int, timestamp: float, prompt_version: int, pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return HEADER.pack(MAGIC, index, timestamp, prompt_version) + buffer.getvalue()


def decode_frame(message: bytes) -> Frame:
    if len(message) < HEADER.size or message[:4] != MAGIC:
        raise ProtocolError("not an arcade frame")
    _, index, timestamp, version = HEADER.unpack_from(message)
    return Frame(index, timestamp, version, message[HEADER.size :])


@dataclass(frozen=True)
class Control:
    type: str
    text: str | None = None
    """A prompt's text; an offer's SDP."""
    candidate: dict | None = None
    """An ICE candidate: {"candidate": "candidate:...", "sdpMid": ..., "sdpMLineIndex": ...}."""
    session: str | None = None
    """The session an offer is for (it must be the viewer's own)."""
    strength: float | None = None
    """An offer that sends a camera: how far its frames are noised, in (0, 1] (None: the default)."""


def parse_control(message: str | bytes) -> Control:
    """Validate one control message (a text message's str); raise ProtocolError with what is wrong."""
    if not isinstance(message, str):
        raise ProtocolError("control messages are JSON text messages, not binary")
    size = _utf8_size(message)
    if size > MAX_OFFER_BYTES:
        raise ProtocolError(f"message longer than {MAX_MESSAGE_BYTES} bytes (an offer: {MAX_OFFER_BYTES})")
    try:
        data = json.loads(message)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(_too_long(size) or "message is not JSON") from err
    if size > MAX_MESSAGE_BYTES and not (isinstance(data, dict) and data.get("type") == "offer"):
        raise ProtocolError(_too_long(size))
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError('message must be a JSON object with a string "type"')
    kind = data["type"]
    if kind not in CONTROL_TYPES:
        raise ProtocolError(f"unknown message type {kind[:40]!r}; known: {', '.join(CONTROL_TYPES)}")
    if kind in SIGNALS:
        return _signal(kind, data)
    if kind != "prompt":
        return Control(kind)
    return Control("prompt", clean_prompt(data.get("text")))


def _too_long(size: int) -> str | None:
    return f"message longer than {MAX_MESSAGE_BYTES} bytes" if size > MAX_MESSAGE_BYTES else None


def _signal(kind: str, data: dict) -> Control:
    """An offer {"sdp": ..., "session": optional}, an ICE candidate {"candidate": {...} or null}, a hangup."""
    session = data.get("session")
    if session is not None and not isinstance(session, str):
        raise ProtocolError('"session" must be a string')
    if kind == "offer":
        if not isinstance(data.get("sdp"), str) or not data["sdp"].startswith("v=0"):
            raise ProtocolError('an offer needs "sdp": the session description of the page (it starts with v=0)')
        strength = data.get("strength")
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                     or not 0.0 < strength <= 1.0):  # fmt: skip
            raise ProtocolError('an offer\'s "strength" (for its camera) must be a number in (0, 1]')
        return Control("offer", data["sdp"], session=session, strength=strength)
    if kind == "ice":
        candidate = data.get("candidate")
        if candidate is not None and not (isinstance(candidate, dict) and isinstance(candidate.get("candidate"), str)):
            raise ProtocolError('an ice message needs "candidate": {"candidate": "candidate:...", ...} or null')
        return Control("ice", candidate=candidate, session=session)
    return Control("hangup", session=session)


def clean_prompt(text: object) -> str:
    """The prompt as every rank will get it (runs of whitespace made one space), or ProtocolError.

    The one definition of an acceptable prompt: the control packet that carries it to every rank
    holds MAX_PROMPT_BYTES of UTF-8, so the limit is in those bytes, and text that has no UTF-8
    form (a lone surrogate, which JSON can spell as "\\ud800") is refused here, not on a rank.
    """
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError('a prompt message needs a non-empty string "text"')
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise ProtocolError("prompt contains control characters")
    text = " ".join(text.split())
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ProtocolError("prompt is not valid Unicode (it contains a lone surrogate)") from err
    if size > MAX_PROMPT_BYTES:
        raise ProtocolError(f"prompt longer than {MAX_PROMPT_BYTES} bytes of UTF-8 (it has {size})")
    return text


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is 3 bytes on the wire too


def close_reason(text: str, limit: int = MAX_CLOSE_REASON_BYTES) -> str:
    """`text` fitted to a close frame: whole words up to `limit` bytes of UTF-8, "..." where cut."""
    if len(text.encode("utf-8")) <= limit:
        return text
    words, kept = text.split(" "), ""
    for word in words:
        longer = f"{kept} {word}" if kept else word
        if len((longer + "...").encode("utf-8")) > limit:
            break
        kept = longer
    if not kept:  # one word longer than the limit: cut it by bytes, whole characters only
        kept = text.encode("utf-8")[: limit - 3].decode("utf-8", "ignore")
    return kept.rstrip(" ;,:") + "..."


def reply(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


def prometheus(stats: dict, prefix: str = "arcade") -> str:
    """Server stats in Prometheus' text format: each number a gauge (a counter if it ends in
    _total); lists of records (METRIC_LISTS) become labelled series; text is left out."""
    series: dict[str, list[tuple[str, float]]] = {}
    for key, value in stats.items():
        if key in METRIC_LISTS and isinstance(value, list):
            label = METRIC_LISTS[key]
            for record in value:
                tag = f'{{{label}="{record.get(label)}"}}'
                for field, number in record.items():
                    if field != label and _number(number) is not None:
                        series.setdefault(_metric(f"{prefix}_{label}_{field}"), []).append((tag, _number(number)))
        elif _number(value) is not None:
            series.setdefault(_metric(f"{prefix}_{key}"), []).append(("", _number(value)))
    lines = []
    for name, samples in series.items():
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.extend(f"{name}{tag} {number:g}" for tag, number in samples)
    return "\n".join(lines) + "\n"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def _metric(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


# -- start from pixels: an uploaded image or clip ------------------------------------------------

UPLOAD_MAGIC = b"ARCU"
MAX_UPLOAD_BYTES = 4 * 2**20
"""An upload's file (4 MiB): a photo, or a few seconds of video; frames past engine/media's limits
are refused too."""


def is_upload(message: str | bytes) -> bool:
    return isinstance(message, bytes) and message[:4] == UPLOAD_MAGIC


VIDEO_IN_MAGIC = b"ARCV"
VIDEO_IN_HEADER = struct.Struct("<4sf")  # magic, strength


def is_video_in(message: str | bytes) -> bool:
    return isinstance(message, bytes) and message[:4] == VIDEO_IN_MAGIC


def video_in_upload(message: bytes, limit: int = MAX_UPLOAD_BYTES) -> tuple[float, bytes]:
    """(strength, clip file) of a video-in message, checked as an upload; else ProtocolError."""
    if len(message) < VIDEO_IN_HEADER.size:
        raise ProtocolError("a video-in upload is b'ARCV', a float32 strength, then the clip")
    _, strength = VIDEO_IN_HEADER.unpack_from(message)
    if not 0.0 < strength <= 1.0:  # NaN fails too
        raise ProtocolError(f"video-in strength must lie in (0, 1], got {strength:g}")
    return strength, upload_file(UPLOAD_MAGIC + message[VIDEO_IN_HEADER.size :], limit)


def upload_file(message: bytes, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The file an upload message carries, if its size and first bytes are acceptable; else
    ProtocolError (one line). Decoding is left to engine/media."""
    data = message[len(UPLOAD_MAGIC) :]
    if not data:
        raise ProtocolError("an upload needs a file after its 4-byte header")
    if len(data) > limit:
        raise ProtocolError(f"upload of {len(data) / 2**20:.1f} MiB is over the limit of {limit / 2**20:.1f} MiB")
    try:
        sniff(data)
    except MediaError as err:
        raise ProtocolError(f"upload: {err}") from None
    return data
