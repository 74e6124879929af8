"""Sessions spread over replicas: each replica holds the model and runs its own session manager.

The serving rank's web server talks to every replica through the same object, `Replica`: calls
go in from any thread (`submit` -> a Future), and a loop of its own hands back each pass
(`Cycle`: answers, frames, stats) to `on_cycle`. A replica in the serving process is a
`LocalReplica` (its loop runs the manager's rounds in a thread); one on another rank is a
`RemoteReplica`, whose loop relays requests and cycles over a point-to-point `Channel` while that
rank runs `serve_replica` (gloo or NCCL: parallel/replicas.py). Each replica has a loop and a
channel of its own, so a slow or dead replica holds up no other: its failure (an error it
reports, a closed connection, a peer silent past the timeout) ends its sessions, through
`on_failure`, and nothing else. A replica is a rank group (a cascade x sp of ranks, or one rank):
the server talks to its leader, which runs the manager and steps the group's ranks
(engine/serving/group.py).

Between ranks nothing is pickled: a packet is a JSON header and the frames' raw bytes
(engine/serving/packets.py).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from engine.serving.live import Cycle, Request, SessionDesk
from engine.serving.packets import decode, encode

log = logging.getLogger(__name__)

IDLE_S = 0.01
"""How long a loop rests after a pass that had nothing to do (no request, no frame)."""


class ReplicaDown(RuntimeError):
    """The replica a request went to has failed or stopped (the message says why)."""


class Channel(Protocol):
    """Packets both ways between the serving rank and one replica rank, in order."""

    def send(self, packet: np.ndarray) -> None:
        """Send a uint8 packet (blocks until the peer has it or the link fails)."""

    def recv(self) -> np.ndarray:
        """The next uint8 packet (raises when the peer is gone or silent past the timeout)."""


class Replica:
    """One session manager's loop as the server sees it (see the module docstring)."""

    def __init__(self, index: int, name: str):
        self.index, self.name = index, name
        self.alive, self.failure = True, ""
        self.server: dict = {}
        """The manager's latest server-wide stats."""
        self.placed_since_stats = 0
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._tickets = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heard = threading.Event()
        """Set at its first stats (or its end): until then its headroom is unknown."""

    def submit(self, op: str, *args) -> Future:
        """Ask the manager for `op(*args)` at its next pass; the Future gets {"ok": ...} or
        {"error": ...}, or ReplicaDown."""
        future: Future = Future()
        with self._lock:
            if not self.alive:
                future.set_exception(ReplicaDown(self.failure))
                return future
            ticket = next(self._tickets)
            self._futures[ticket] = future
        self._requests.put(Request(ticket, op, tuple(args)))
        return future

    def start(self, on_cycle: Callable[[Replica, Cycle], None], on_failure: Callable[[Replica, str], None]) -> None:
        self._thread = threading.Thread(target=self._loop, args=(on_cycle, on_failure), name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def headroom(self) -> float:
        """Room for more sessions as the manager last said it (its `headroom`, else capacity
        minus active), less the sessions placed here since; higher is better."""
        server = self.server
        if isinstance(server.get("headroom"), (int, float)):
            room = server["headroom"]
        elif isinstance(server.get("capacity"), (int, float)) and isinstance(server.get("active"), (int, float)):
            room = server["capacity"] - server["active"]
        else:
            room = -server.get("active", 0) if isinstance(server.get("active"), (int, float)) else 0
        return room - self.placed_since_stats

    # -- the loop ----------------------------------------------------------------------------------

    def exchange(self, requests: list[Request]) -> Cycle:
        """One pass of the manager with these requests."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once when the loop ends, however it ends."""

    def _loop(self, on_cycle, on_failure) -> None:
        try:
            while not self._stop.is_set():
                requests = self._drain()
                cycle = self.exchange(requests)
                self._settle(cycle)
                on_cycle(self, cycle)
                if not requests and not cycle.blocks:
                    self._stop.wait(IDLE_S)
        except Exception as err:  # the manager raised, or the link to its rank broke
            log.warning("%s failed", self.name, exc_info=True)
            self._fail(f"{self.name} failed: {type(err).__name__}: {err}".strip())
            on_failure(self, self.failure)
        else:
            self._fail(f"{self.name} stopped")
        finally:
            self.finish()

    def _drain(self) -> list[Request]:
        requests = []
        while True:
            try:
                requests.append(self._requests.get_nowait())
            except queue.Empty:
                return requests

    def _settle(self, cycle: Cycle) -> None:
        if cycle.server is not None:
            self.server, self.placed_since_stats = cycle.server, 0
            self.heard.set()
        with self._lock:
            futures = [(self._futures.pop(t), a) for t, a in cycle.answers.items() if t in self._futures]
        for future, answer in futures:
            future.set_result(answer)

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.alive, self.failure = False, self.failure or reason
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.set_exception(ReplicaDown(self.failure))
        self.heard.set()


class LocalReplica(Replica):
    """A manager in this process, run by the replica's own thread."""

    def __init__(self, index: int, desk: SessionDesk, name: str | None = None):
        super().__init__(index, name or f"replica {index}")
        self.desk = desk

    def exchange(self, requests: list[Request]) -> Cycle:
        return self.desk.cycle(requests)


class RemoteReplica(Replica):
    """A manager on another rank: each pass sends the requests and receives that rank's cycle."""

    def __init__(self, index: int, channel: Channel, rank: int, name: str | None = None):
        super().__init__(index, name or f"replica {index} (rank {rank})")
        self.channel = channel

    def submit(self, op: str, *args) -> Future:
        if op == "video_in":  # a live source is an object of this process: it cannot travel
            future: Future = Future()
            future.set_result({"error": f"{self.name} runs on another rank: video in needs a replica in this process"})
            return future
        return super().submit(op, *args)

    def exchange(self, requests: list[Request]) -> Cycle:
        self.channel.send(encode({"requests": [[r.ticket, r.op, list(r.args)] for r in requests]}))
        header, blobs = decode(self.channel.recv())
        if "failed" in header:
            raise ReplicaDown(header["failed"])
        return cycle_from(header, blobs)

    def finish(self) -> None:
        if self.failure.endswith("stopped"):  # a clean stop: tell the rank; a broken link is left alone
            try:
                self.channel.send(encode({"stop": True}))
            except Exception:  # the rank went meanwhile: nothing to tell
                pass


def serve_replica(desk: SessionDesk, channel: Channel) -> str:
    """A replica rank's life: answer each packet from the serving rank with one pass of the desk,
    until told to stop. A failing manager is reported to the serving rank (which ends this
    replica's sessions) and the rank returns normally, so the job's other ranks keep streaming.
    Returns why it ended."""
    while True:
        header, _ = decode(channel.recv())
        if header.get("stop"):
            return "stopped"
        requests = [Request(int(t), str(op), tuple(args)) for t, op, args in header.get("requests", [])]
        try:
            cycle = desk.cycle(requests)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            channel.send(encode({"failed": reason}))
            return f"failed: {reason}"
        channel.send(encode_cycle(cycle))


# -- cycles as packets (engine/serving/packets.py) ------------------------------------------------


def encode_cycle(cycle: Cycle) -> np.ndarray:
    shapes = {s: [list(b.shape) for b in blocks] for s, blocks in cycle.blocks.items()}
    header = {"answers": {str(t): a for t, a in cycle.answers.items()}, "versions": cycle.versions,
              "stats": cycle.stats, "server": cycle.server, "gone": list(cycle.gone), "shapes": shapes}  # fmt: skip
    return encode(header, [b for blocks in cycle.blocks.values() for b in blocks])


def cycle_from(header: dict, blobs: memoryview) -> Cycle:
    blocks, offset = {}, 0
    for session, shapes in header["shapes"].items():
        blocks[session] = []
        for shape in shapes:
            size = int(np.prod(shape))
            blocks[session].append(np.frombuffer(blobs[offset : offset + size], np.uint8).reshape(shape).copy())
            offset += size
    answers = {int(t): a for t, a in header["answers"].items()}
    return Cycle(answers, blocks, header["versions"], header["stats"], header["server"], tuple(header["gone"]))


def by_headroom(replicas: list[Replica]) -> list[Replica]:
    """The live replicas, the one with most room first (ties: the lower index)."""
    return sorted((r for r in replicas if r.alive), key=lambda r: (-r.headroom(), r.index))
