"""Failing loudly across ranks: which rank stopped, and why.

Every rank keeps a little state in the job's key-value store: its pid and host at start, and per
tick whether it is computing or waiting on its peers. When something goes wrong:
* a rank that raises writes "rank R: cause" to the store before it exits (first report wins);
* a rank whose collective fails (timeout, closed connection) reads the store: the first report if
  there is one; else a rank whose process is gone (same host); else the rank still "running" a
  tick the others are "waiting" in (a hang);
* a rank that dies is also reaped by torchrun, which then stops the others.
So every process ends within the timeout (ParallelConfig.timeout_s), and the message names the
rank and the cause.
"""

from __future__ import annotations

import os
import socket
import time

import torch.distributed as dist

FAILURE_KEY = "arcade/failure"
STATE_KEY = "arcade/state/{rank}"
PROCESS_KEY = "arcade/process/{rank}"
_PEER_TROUBLE = ("gloo", "nccl", "timed out", "connection", "peer")
EXIT_GRACE_S = 1.0


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

    def register(self) -> None:
        """Record this rank's process, so that peers can tell if it died."""
        self._set(PROCESS_KEY.format(rank=self.rank), f"{socket.gethostname()}:{os.getpid()}")

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
        time.sleep(EXIT_GRACE_S)  # a killed peer closes its sockets before it is gone
        cause = self._get(FAILURE_KEY) or self._dead_rank() or self._stuck_rank()
        if cause is None:
            return own
        self._record(cause)  # ranks that stop later (terminated by torchrun) report the same cause
        return f"{cause} (rank {self.rank} saw: {type(error).__name__})"

    # -- reading the store -----------------------------------------------------------------------

    def _dead_rank(self) -> str | None:
        host = socket.gethostname()
        for rank in range(self.world_size):
            record = self._get(PROCESS_KEY.format(rank=rank))
            if record is None or rank == self.rank:
                continue
            their_host, pid = record.rsplit(":", 1)
            if their_host == host and not _alive(int(pid)):
                return f"rank {rank} (pid {pid}) died"
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


def _alive(pid: int) -> bool:
    """Whether a process on this host runs; a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
