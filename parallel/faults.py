"""Failing loudly across ranks: which rank stopped, and why.

Every rank keeps a little state in the job's key-value store: its pid and host at start, a
sign of life from a background thread every BEAT_S, and per tick whether it is computing or
waiting on its peers. When something goes wrong:
* a rank that raises writes "rank R: cause" to the store before it exits (first report wins);
* a rank whose collective fails (timeout, closed connection) reads the store: the first report if
  there is one; else a rank whose process is gone (same host); else a frozen rank, whose signs of
  life stopped (SIGSTOP, a debugger, a deadlock that holds the interpreter); else the rank still
  "running" a tick the others are "waiting" in (a hang in Python code);
* a frozen rank on the same host is then killed: it cannot act on torchrun's SIGTERM, and
  torchrun would wait 30 s (its --shutdown-timeout) before killing it itself;
* a rank that dies is also reaped by torchrun, which then stops the others.
So every process ends within about the timeout (ParallelConfig.timeout_s), and the message names
the rank and the cause.

A sessions server's rank groups fail alone instead (`blame`): a group's leader that sees a peer
error names the rank of its group at fault (its own report, died, froze) and ends nothing, so that
the other groups keep streaming; the group's sessions end with that reason.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import torch.distributed as dist

FAILURE_KEY = "arcade/failure"
RANK_FAILURE_KEY = "arcade/failure/{rank}"
STATE_KEY = "arcade/state/{rank}"
PROCESS_KEY = "arcade/process/{rank}"
ALIVE_KEY = "arcade/alive/{rank}"
_PEER_TROUBLE = ("gloo", "nccl", "timed out", "connection", "peer")
BEAT_S = 0.25
EXIT_GRACE_S = 1.5
"""How long a failing rank waits before reading the store: a killed peer closes its sockets
before it is gone, and a live one beats several times meanwhile."""


def _store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):  # no store behind this group
        return None


def is_peer_trouble(error: BaseException) -> bool:
    """Errors that say a *peer* is gone or late, rather than what went wrong."""
    if isinstance(error, SystemExit):  # SIGTERM from torchrun after another rank failed
        return True
    return isinstance(error, dist.DistError) or any(word in str(error).lower() for word in _PEER_TROUBLE)


class FaultReporter:
    """Progress records and failure reports through the job's store (no-ops in one process)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.store = _store()
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None

    def register(self) -> None:
        """Record this rank's process, so that peers can tell if it died, and start its signs of life."""
        pid = os.getpid()
        self._set(PROCESS_KEY.format(rank=self.rank), f"{socket.gethostname()}:{pid}:{_start_time(pid)}")
        if self.store is not None and self._beats is None:
            self._beats = threading.Thread(target=self._beat, name="rank-alive", daemon=True)
            self._beats.start()

    def close(self) -> None:
        self._stop_beats.set()
        if self._beats is not None:
            self._beats.join(timeout=5)

    def heartbeat(self, tick: int, state: str = "running") -> None:
        """`running` at the start of a tick, `waiting` when about to wait on peers."""
        self._set(STATE_KEY.format(rank=self.rank), f"{tick}:{state}")

    def report(self, error: BaseException) -> str:
        """The message naming the failing rank and cause; recorded if this rank is the cause."""
        own = f"rank {self.rank}: {type(error).__name__}: {error}".strip()
        if self.store is None:
            return own
        if not is_peer_trouble(error):
            self._record(own)
            return own
        before = self._signs_of_life()
        time.sleep(EXIT_GRACE_S)
        cause = self._get(FAILURE_KEY) or self._dead_rank() or self._frozen_rank(before) or self._stuck_rank()
        if cause is None:
            return own
        self._record(cause)  # ranks that stop later (terminated by torchrun) report the same cause
        return f"{cause} (rank {self.rank} saw: {type(error).__name__})"

    def note(self, error: BaseException) -> str:
        """Record this rank's own failure for its group's leader to read (`blame`); the line."""
        own = f"rank {self.rank}: {type(error).__name__}: {error}".strip()
        self._set(RANK_FAILURE_KEY.format(rank=self.rank), own)
        return own

    def blame(self, error: BaseException, ranks: list[int]) -> str | None:
        """Which of `ranks` (a group) a peer error came from: one that recorded its failure, died,
        or froze; None if it is not a peer error or no rank can be named. Ends no process."""
        if self.store is None or not is_peer_trouble(error):
            return None
        before = self._signs_of_life()
        time.sleep(EXIT_GRACE_S)
        reported = [self._get(RANK_FAILURE_KEY.format(rank=r)) for r in ranks if r != self.rank]
        return next((r for r in reported if r), None) or self._dead_rank(ranks) or self._frozen_rank(before, ranks)

    def _beat(self) -> None:
        count = 0
        while not self._stop_beats.wait(BEAT_S):
            count += 1
            self._set(ALIVE_KEY.format(rank=self.rank), str(count))

    # -- reading the store -----------------------------------------------------------------------

    def _processes(self, ranks: list[int] | None = None):
        """(rank, host, pid, start time) of every other rank that registered (of `ranks` if given)."""
        for rank in range(self.world_size) if ranks is None else ranks:
            record = self._get(PROCESS_KEY.format(rank=rank))
            if record is not None and rank != self.rank:
                host, pid, start = record.rsplit(":", 2)
                yield rank, host, int(pid), start

    def _dead_rank(self, ranks: list[int] | None = None) -> str | None:
        host = socket.gethostname()
        for rank, their_host, pid, start in self._processes(ranks):
            if their_host == host and not _alive(pid, start):
                return f"rank {rank} (pid {pid}) died"
        return None

    def _signs_of_life(self) -> dict[int, str | None]:
        return {r: self._get(ALIVE_KEY.format(rank=r)) for r in range(self.world_size) if r != self.rank}

    def _frozen_rank(self, before: dict[int, str | None], ranks: list[int] | None = None) -> str | None:
        """A rank whose signs of life stopped during the grace period; ended if on this host
        (unless `ranks` narrows the search to a group, whose failure ends nothing)."""
        after = self._signs_of_life()
        for rank, host, pid, start in self._processes(ranks):
            if after.get(rank) is None or after[rank] != before.get(rank):
                continue
            cause = f"rank {rank} (pid {pid} on {host}) froze: no sign of life for {EXIT_GRACE_S:g} s"
            if host != socket.gethostname():
                return cause
            if _state(pid, start) in ("T", "t"):
                cause += " (stopped by a signal or a debugger)"
            return cause + ("; ended it" if ranks is None and _end(pid, start) else "")
        return None

    def _stuck_rank(self) -> str | None:
        states = {r: self._get(STATE_KEY.format(rank=r)) for r in range(self.world_size)}
        parsed = {r: s.split(":") for r, s in states.items() if s}
        if not parsed:
            return None
        tick = min(int(t) for t, _ in parsed.values())
        running = [r for r, (t, state) in parsed.items() if int(t) == tick and state == "running"]
        waiting = [r for r, (t, state) in parsed.items() if state == "waiting" or int(t) > tick]
        if running and waiting:
            return f"rank {running[0]} stopped responding in tick {tick} (ranks {waiting} were waiting for it)"
        return None

    # -- store access that never raises -------------------------------------------------------------

    def _set(self, key: str, value: str) -> None:
        if self.store is not None:
            try:
                self.store.set(key, value)
            except RuntimeError:  # the store went with the rank that hosted it
                pass

    def _get(self, key: str) -> str | None:
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except RuntimeError:
            return None

    def _record(self, message: str) -> None:
        try:
            self.store.compare_set(FAILURE_KEY, "", message)  # the first failure wins
        except RuntimeError:
            pass


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None without the process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def _start_time(pid: int) -> str:
    """When the process started (clock ticks since boot): with the pid, names one process for good."""
    try:
        fields = _stat(pid)
    except OSError:  # no /proc
        return ""
    return fields[19] if fields else ""


def _state(pid: int, start: str) -> str | None:
    """The process's state letter (R, S, T, Z, ...), None if gone or if the pid is now another's."""
    try:
        fields = _stat(pid)
    except OSError:
        return None
    if fields is None or (start and fields[19] != start):
        return None
    return fields[0]


def _alive(pid: int, start: str = "") -> bool:
    """Whether a process on this host runs; a zombie (killed, not yet reaped) does not."""
    try:
        fields = _stat(pid)
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return fields is not None and fields[0] not in ("Z", "X") and (not start or fields[19] == start)


def _end(pid: int, start: str) -> bool:
    """Kill a frozen peer's process (checked to be the one that registered)."""
    if not start or _state(pid, start) in (None, "Z", "X"):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
