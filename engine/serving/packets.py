"""Packets between ranks: a JSON header, then raw bytes (nothing is pickled).

    [uint32 length][JSON header][blob bytes ...]    one uint8 array

Replicas ship cycles this way (engine/serving/replicas.py), a group's leader its rounds
(engine/serving/group.py). A receiver trusts only what the JSON and the shapes it names say.
"""

from __future__ import annotations

import json
import struct

import numpy as np

_LENGTH = struct.Struct("<I")


def encode(header: dict, blobs: list[np.ndarray] = ()) -> np.ndarray:
    """`[length][JSON header][blob bytes...]` as one uint8 array."""
    text = json.dumps(header).encode("utf-8")
    parts = [np.frombuffer(_LENGTH.pack(len(text)) + text, np.uint8)]
    parts += [np.ascontiguousarray(b, dtype=np.uint8).reshape(-1) for b in blobs]
    return np.concatenate(parts)


def decode(packet: np.ndarray) -> tuple[dict, memoryview]:
    """(header, the bytes after it)."""
    raw = memoryview(np.ascontiguousarray(packet, dtype=np.uint8)).cast("B")
    (length,) = _LENGTH.unpack_from(raw)
    return json.loads(bytes(raw[_LENGTH.size : _LENGTH.size + length])), raw[_LENGTH.size + length :]
