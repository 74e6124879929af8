"""What viewers ask of a stream, and the packet that carries it to every rank once per tick.

The serving rank's `Controls` hold the current prompt, pause and stop. Each tick the serving rank
packs them into a fixed-size packet and the other ranks receive a copy through `Ranks`, so every
rank switches prompts, pauses and stops at the same tick. The packet holds exactly what the
protocol's `clean_prompt` accepts (MAX_PROMPT_BYTES of UTF-8), and only cleaned prompts enter
`Controls`, so whatever a viewer got an ack for reaches every rank intact.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import NamedTuple, Protocol

import torch

from engine.serving.protocol import MAX_PROMPT_BYTES, clean_prompt

_HEADER = struct.Struct("<III")  # flags (1 paused, 2 stopped), prompt version, prompt length in bytes
PACKET_BYTES = _HEADER.size + MAX_PROMPT_BYTES


class ControlState(NamedTuple):
    prompt: str
    version: int
    paused: bool
    stopped: bool


class Ranks(Protocol):
    """The processes a stream runs on, as the stream sees them (parallel.topology.Topology is one)."""

    world_size: int

    @property
    def is_decoder(self) -> bool:
        """Whether this process serves: its controls are the ones every rank follows."""

    def broadcast_control(self, packet: torch.Tensor) -> None:
        """Overwrite `packet` (uint8, PACKET_BYTES) on every rank with the serving rank's, in place."""


class OneProcess:
    """A stream on a single process: it serves, and has no one to tell."""

    world_size = 1
    is_decoder = True

    def broadcast_control(self, packet: torch.Tensor) -> None:
        pass


class Controls:
    """What viewers asked for; thread-safe; read by the engine once per tick.

    The latest prompt wins: a request that no tick ran under yet is replaced by the next one and
    its request time forgotten, so prompts sent while paused (or faster than ticks) take no memory.
    """

    def __init__(self, prompt: str):
        self._lock = threading.Lock()
        self.prompt, self.version, self.paused, self.stopped = clean_prompt(prompt), 0, False, False
        self.requested_at: dict[int, float] = {}
        self._running = 0  # the newest version a tick ran under

    def request_prompt(self, text: str) -> int:
        """Make `text` the prompt from the next tick on; ProtocolError if no rank could take it."""
        text = clean_prompt(text)
        with self._lock:
            self.requested_at = {v: t for v, t in self.requested_at.items() if v <= self._running}
            self.version += 1
            self.prompt = text
            self.requested_at[self.version] = time.perf_counter()
            return self.version

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def snapshot(self) -> ControlState:
        with self._lock:
            return ControlState(self.prompt, self.version, self.paused, self.stopped)

    def running(self, version: int) -> None:
        """A tick runs under prompt `version` (from then on its request waits to be settled)."""
        with self._lock:
            self._running = max(self._running, version)

    def settle(self, version: int) -> float | None:
        """When prompt `version` was requested (None if already settled); forgets older requests."""
        with self._lock:
            requested = self.requested_at.get(version)
            self.requested_at = {v: t for v, t in self.requested_at.items() if v > version}
            return requested


def pack(state: ControlState) -> torch.Tensor:
    data = state.prompt.encode("utf-8")
    if len(data) > MAX_PROMPT_BYTES:  # Controls hold only cleaned prompts: a bug, not a viewer's doing
        raise ValueError(f"a {len(data)}-byte prompt reached the control packet")
    packet = bytearray(PACKET_BYTES)
    _HEADER.pack_into(packet, 0, int(state.paused) | 2 * int(state.stopped), state.version, len(data))
    packet[_HEADER.size : _HEADER.size + len(data)] = data
    return torch.frombuffer(packet, dtype=torch.uint8)


def unpack(packet: torch.Tensor) -> ControlState:
    raw = packet.numpy().tobytes()
    flags, version, length = _HEADER.unpack_from(raw)
    prompt = raw[_HEADER.size : _HEADER.size + length].decode("utf-8")
    return ControlState(prompt, version, bool(flags & 1), bool(flags & 2))


def share(controls: Controls, ranks: Ranks) -> ControlState:
    """The serving rank's controls, on every rank (the packet makes the trip even on one process,
    so that one process checks the same path as many)."""
    packet = pack(controls.snapshot()) if ranks.is_decoder else torch.zeros(PACKET_BYTES, dtype=torch.uint8)
    ranks.broadcast_control(packet)
    return unpack(packet)
