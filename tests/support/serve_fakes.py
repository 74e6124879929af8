"""A session manager with no model behind it, for tests of the server's sessions and replicas.

Its API is the one the server drives (engine/serving/live.py SESSION_OPS, round, stats,
server_stats). Every frame says whose it is: red = the session's seed x 20, green = the block's
index, blue = the prompt version x 40 (uniform colors survive JPEG within a few levels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Opened:
    id: str


@dataclass
class Refused:
    reason: str
    retry_after_s: float
    queue_position: int
    ticket: str | None = None
    offer_fps: float | None = None


@dataclass
class FakeSession:
    seed: int
    opened: float
    blocks: int = 0
    version: int = 0
    paused: bool = False
    left_at: float | None = None
    viewers: int = 1
    waits: list = field(default_factory=list)


class FakeManager:
    """Paced like a real stream: a session gets a block while it is less than `lead_s` ahead of
    `fps` from its opening. `explode()` makes the next round raise (a failing replica)."""

    def __init__(self, capacity=3, block_frames=3, size=16, fps=32, lead_s=0.5, grace_s=30.0, name="m", offer_fps=None):
        self.capacity, self.block_frames, self.size, self.fps = capacity, block_frames, size, fps
        self.offer_fps = offer_fps
        """Beyond capacity, one more session is offered at this frame rate (None: no offer)."""
        self.lead_s, self.grace_s, self.name = lead_s, grace_s, name
        self.sessions: dict[str, FakeSession] = {}
        self.rounds, self.refused, self._ids, self._boom = 0, 0, 0, False
        self.tickets: list = []
        self.uploads: list = []
        self.video_ins: list = []

    def open(self, prompt: str, seed: int, ticket: str | None = None, accept: bool = False):
        self.tickets.append(ticket)
        offer = self.offer_fps if self.offer_fps and len(self.sessions) == self.capacity else None
        if len(self.sessions) >= self.capacity and not (accept and offer):
            self.refused += 1
            return Refused("all sessions taken", retry_after_s=2.5, queue_position=1, ticket="t1", offer_fps=offer)
        self._ids += 1
        session_id = f"{self.name}{self._ids}"
        self.sessions[session_id] = FakeSession(seed, time.monotonic())
        return Opened(session_id)

    def _get(self, session_id: str) -> FakeSession:
        if session_id not in self.sessions:
            raise KeyError(f"no session {session_id}")
        return self.sessions[session_id]

    def join(self, session_id):
        self._get(session_id).viewers += 1
        return Opened(session_id)

    def set_prompt(self, session_id, prompt):
        self._get(session_id).version += 1
        return self._get(session_id).version

    def pause(self, session_id):
        self._get(session_id).paused = True

    def resume(self, session_id):
        self._get(session_id).paused = False

    def viewer_left(self, session_id):
        s = self._get(session_id)
        s.viewers -= 1
        s.left_at = time.monotonic() if s.viewers == 0 else None

    def viewer_returned(self, session_id):
        s = self._get(session_id)
        s.viewers, s.left_at = s.viewers + 1, None
        return Opened(session_id)

    def close(self, session_id):
        self.sessions.pop(session_id, None)

    def start_from(self, session_id, upload: str):
        """Records the upload (base64 text, as the server sends it); the session goes on."""
        self._get(session_id)
        self.uploads.append((session_id, upload))
        return {"blocks": 1}

    def video_in(self, session_id, source, strength: float = 0.6):
        """Records (session, frames, strength) of a clip to restyle; the session goes on."""
        self._get(session_id)
        self.video_ins.append((session_id, list(source), strength))
        return {"strength": strength}

    def explode(self):
        self._boom = True

    def round(self) -> dict:
        if self._boom:
            raise RuntimeError("the device fell over")
        self.rounds += 1
        now, out = time.monotonic(), {}
        for session_id, s in list(self.sessions.items()):
            if s.left_at is not None and now - s.left_at > self.grace_s:
                del self.sessions[session_id]
                continue
            ahead = s.blocks * self.block_frames / self.fps - (now - s.opened)
            if not s.paused and ahead < self.lead_s:
                out[session_id] = [self._block(s)]
                s.blocks += 1
        return out

    def _block(self, s: FakeSession) -> np.ndarray:
        color = np.array([(s.seed * 20) % 256, s.blocks % 256, (s.version * 40) % 256], dtype=np.uint8)
        return np.broadcast_to(color, (self.block_frames, self.size, self.size, 3)).copy()

    def stats(self, session_id):
        s = self._get(session_id)
        return {"slack_s": 0.25, "stalls": 0, "stall_s": 0.0, "fidelity": 0, "cache_hits": None,
                "blocks": s.blocks}  # fmt: skip

    def server_stats(self):
        return {"active": len(self.sessions), "capacity": self.capacity, "rounds": self.rounds,
                "refused": self.refused}  # fmt: skip


def owner(frame) -> int:
    """The seed of the session a fake frame belongs to (seeds below 13)."""
    return round(colors(frame)[0] / 20)


def colors(frame) -> tuple[int, int, int]:
    """The (red, green, blue) a fake frame was filled with, read back from its JPEG."""
    return tuple(int(round(c)) for c in frame.image().reshape(-1, 3).mean(axis=0))
