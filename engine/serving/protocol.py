"""The viewer protocol: binary frame messages out, JSON control messages both ways.

Frame (server -> viewer), one WebSocket binary message per video frame:

    offset  size  field
    0       4     magic b"ARC1"
    4       4     frame index, uint32 little-endian (0, 1, 2, ... in stream order)
    8       8     timestamp, float64 little-endian: seconds since the stream started
    16      4     prompt version, uint32 little-endian (which accepted prompt shaped this frame)
    20      -     the frame as a JPEG image

Control (viewer -> server), one JSON object per text message, at most MAX_MESSAGE_BYTES (longer
ones get an error; over 16 times that, the server closes the connection with code 1009):

    {"type": "prompt", "text": "a red circle moving left"}   -> {"type": "ack", "of": "prompt", "version": 3}
    {"type": "pause"} / {"type": "resume"}                   -> {"type": "ack", "of": "pause"}
    {"type": "stats"}                                        -> {"type": "stats", ...}

Anything else - not JSON, not an object, an unknown type, a missing or overlong prompt, bytes
that are not UTF-8 - is answered with {"type": "error", "error": "..."} and changes nothing.
The server also pushes {"type": "stats", ...} about once a second.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAGIC = b"ARC1"
HEADER = struct.Struct("<4sIdI")  # magic, frame index, timestamp, prompt version
MAX_MESSAGE_BYTES = 4096
MAX_PROMPT_CHARS = 500
JPEG_QUALITY = 85
CONTROL_TYPES = ("prompt", "pause", "resume", "stats")


class ProtocolError(ValueError):
    """A control message that is refused (the text becomes the error reply)."""


@dataclass(frozen=True)
class Frame:
    index: int
    timestamp: float
    prompt_version: int
    jpeg: bytes

    def image(self) -> np.ndarray:
        """`[H, W, 3]` uint8."""
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


def parse_control(message: str | bytes) -> Control:
    """Validate one control message; raise ProtocolError with what is wrong."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError("message is not valid UTF-8") from err
    try:
        data = json.loads(message)
    except (ValueError, RecursionError) as err:
        raise ProtocolError("message is not JSON") from err
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError('message must be a JSON object with a string "type"')
    kind = data["type"]
    if kind not in CONTROL_TYPES:
        raise ProtocolError(f"unknown message type {kind[:40]!r}; known: {', '.join(CONTROL_TYPES)}")
    if kind != "prompt":
        return Control(kind)
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError('a prompt message needs a non-empty string "text"')
    if len(text) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise ProtocolError("prompt contains control characters")
    return Control("prompt", " ".join(text.split()))


def reply(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})
