"""Sessions on a rank group: the leader schedules, every rank of the group steps.

A replica may be a group of ranks (a cascade x sp mesh: parallel/topology.py). Its leader runs
the session manager (engine/serving/sessions.py: slack order, fidelity, admission) and, before
every round, casts one packet to the group:

    {"ops": [["open", id, seed, prompt], ["prompt", id, prompt], ["suspend", id], ["resume", id],
             ["close", id], ...],                 # in the order the leader did them
     "steps": [[id, threshold or null], ...]}     # the sessions this round steps, in order

Every follower applies the operations, then steps the same sessions in the same order with
`step_streams`, so the ranks of a group meet in their collectives in one order, and the finished
blocks travel to the group's sink (the leader), which decodes them. Joins, leaves, switches,
suspends and resumes therefore land on every rank at the same round boundary. Nothing is
pickled: the packet is JSON, and a prompt travels as the cleaned text the leader accepted, so
every rank conditions on exactly the same words.

The cast is a `RoundCast` (a broadcast inside the group: parallel/replicas.py `GroupCast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.plan.timeline import Tick
from engine.runtime.executor import Executor
from engine.serving.packets import decode, encode


class RoundCast(Protocol):
    """The leader's packets to every rank of its group, in order."""

    def send(self, packet: np.ndarray) -> None:
        """On the leader: every rank of the group gets `packet`."""

    def recv(self) -> np.ndarray:
        """On a follower: the leader's next packet."""


class Outbox:
    """What the leader did since the last round, for its followers (one packet per round)."""

    def __init__(self, cast: RoundCast):
        self.cast = cast
        self.ops: list[list] = []

    def add(self, op: str, session: str, *args) -> None:
        self.ops.append([op, session, *args])

    def round(self, steps: list[tuple[str, float | None, int | None]]) -> None:
        """Cast the operations so far and this round's sessions, each with its fidelity: a feature-cache
        threshold and a number of denoising steps for blocks that start now (None: as configured)."""
        ops, self.ops = self.ops, []
        self.cast.send(encode({"ops": ops, "steps": [list(step) for step in steps]}))

    def stop(self) -> None:
        """Tell the followers to stop (they return from `follow`)."""
        self.cast.send(encode({"stop": True}))


@dataclass
class Followed:
    """One session as a follower holds it: its executor (this rank's share) and plan position."""

    executor: Executor
    ticks: object
    next_tick: Tick
    text: object


def follow(manager, cast: RoundCast) -> str:
    """A follower rank's life: apply each round's operations and step its sessions, until the
    leader says stop. `manager` is a SessionManager built exactly as the leader's (same preset,
    limits and ranks); only its stream factory and `step_streams` are used here. Returns why it
    ended. An error (a peer gone or silent past the timeout) is raised to the caller."""
    streams: dict[str, Followed] = {}
    while True:
        header, _ = decode(cast.recv())
        if header.get("stop"):
            return "stopped"
        with torch.no_grad():
            for op in header["ops"]:
                _apply(manager, streams, *op)
            chosen = [streams[str(sid)] for sid, _, _ in header["steps"]]
            for stream, (_, threshold, steps) in zip(chosen, header["steps"]):
                stream.executor.skip.set_fidelity(threshold)
                manager.set_steps(stream.ticks, steps)
            manager.step_streams(chosen)


def _apply(manager, streams: dict[str, Followed], op: str, session: str, *args) -> None:
    if op == "open":
        seed, prompt = args
        executor, ticks = manager.new_stream(int(seed))
        streams[session] = Followed(executor, ticks, next(ticks), manager.session.prompts.conditioning(prompt))
    elif op == "prompt":
        streams[session].text = manager.session.prompts.conditioning(args[0])
    elif op == "suspend":
        streams[session].executor.suspend()
    elif op == "resume":
        streams[session].executor.resume()
    elif op == "close":
        streams.pop(session, None)
    else:
        raise ValueError(f"unknown group operation {op!r}")
