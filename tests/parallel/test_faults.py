"""A frozen rank of a stream under torchrun is named, and every rank ends within about the timeout.

    pytest tests/parallel/test_faults.py

A rank stopped with SIGSTOP cannot act on torchrun's SIGTERM; before, the job ended only when
torchrun gave up on it 30 s later, and the messages often blamed another rank. Each case is one
`torchrun --standalone` launch of the stream (tiny preset, gloo on the loopback interface) in its
own session under an outer timeout; the whole session is killed at the end.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

TIMEOUT_S = 8
SLACK_S = 100
"""Allowed past the timeout: grace to read the store and exit, slow on a loaded machine; what it
rules out is waiting for gloo's own 30-minute timeout."""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == pid:
                found.append(int(entry))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = dict(v.split(b"=", 1) for v in environ.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(variables[b"RANK"]) if b"RANK" in variables and b"LOCAL_RANK" in variables else None


def _worker(root: int, rank: int) -> int:
    """The pid of `rank` among the descendants of `root`."""
    todo = [root]
    while todo:
        pid = todo.pop()
        if _rank_of(pid) == rank:
            return pid
        todo.extend(_children(pid))
    raise AssertionError(f"no process of rank {rank} under {root}")


def _session_alive(sid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


@pytest.mark.parametrize("decode_rank, frozen", [(False, 2), (True, 1)])
def test_a_frozen_rank_is_named_and_every_rank_ends_within_the_timeout(decode_rank, frozen):
    command = ["timeout", "-k", "5", "200", sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=3", "-m", "launch.stream", "--preset", "tiny-wan", "--schedule", "cascade",
               "--offset", "1", "--port", "0", "--timeout", str(TIMEOUT_S), "--shared-stream"]  # fmt: skip
    command += ["--decode-rank"] if decode_rank else []
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not any(line.startswith("serving") for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # a few ticks into the stream
        os.kill(_worker(process.pid, frozen), signal.SIGSTOP)
        stopped = time.monotonic()
        process.wait(timeout=TIMEOUT_S + SLACK_S + 30)
        elapsed = time.monotonic() - stopped
        left = _session_alive(process.pid)
    finally:
        _kill_session(process)
        reader.join(timeout=10)
    assert elapsed < TIMEOUT_S + SLACK_S, f"ranks ended {elapsed:.0f} s after the freeze, timeout {TIMEOUT_S} s"
    errors = [line.strip() for line in lines if line.startswith("error:")]
    assert errors and all(e.startswith(f"error: rank {frozen} ") for e in errors), "".join(lines)[-3000:]
    assert not left, f"processes left behind: {left}"


def _kill_session(process: subprocess.Popen) -> None:
    """Everything this test started (its own session: timeout, torchrun, the ranks), stopped or not."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
