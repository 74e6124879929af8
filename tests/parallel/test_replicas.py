"""Sessions spread over replica ranks (gloo on loopback): placement, a failing and a killed
replica, and Ctrl-C, with model-free managers on every rank (tests/support/replica_worker.py), and one
run of the real entry point with the demo model on two ranks.

    pytest tests/parallel/test_replicas.py

The ranks are plain processes with torchrun's environment, not torchrun itself: torchrun stops
every rank when one dies, which is what a killed replica must not do to the others. (Under
torchrun, a replica whose manager fails reports it and exits normally, so torchrun keeps the
others; a replica killed outright takes the job down with it.)
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.serving.test_serve_sessions import Viewer

WORKER = Path(__file__).parents[1] / "support" / "replica_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ranks(command: list[str], world: int, timeout: float = 120):
    """`world` processes of `command` with torchrun's environment; yields (ws url, processes).
    Every process is gone afterwards (SIGINT to rank 0, then the others' own exit, then kill)."""
    port = _free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        deadline, line = time.monotonic() + timeout, ""
        while "serving" not in line:
            line = processes[0].stdout.readline()
            assert time.monotonic() < deadline and (line or processes[0].poll() is None), "rank 0 never served"
        yield "ws://" + re.search(r"http://([\d.]+:\d+)", line).group(1) + "/ws", processes
    finally:
        _end(processes)


def _end(processes) -> None:
    if processes[0].poll() is None:
        processes[0].send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"a rank (pid {process.pid}) did not stop") from None


async def _ended(viewer: Viewer) -> dict:
    with pytest.raises(ConnectionClosed):
        await viewer.read(10**6, seconds=60)
    return viewer.replies[-1]


def test_sessions_over_three_replicas_outlive_a_failed_and_a_killed_one(tmp_path):
    command = [sys.executable, str(WORKER), str(tmp_path), "--port", "0", "--timeout", "20"]

    async def run(url, processes):
        viewers = [await Viewer.open(url) for _ in range(6)]
        assert all(v.hello["type"] == "session" for v in viewers), [v.hello for v in viewers]
        on = {r: [v for v in viewers if v.hello["replica"] == r] for r in range(3)}
        assert all(on.values()), f"placed on every replica: {[v.hello['replica'] for v in viewers]}"
        for viewer in viewers:
            await viewer.read(3)
        (tmp_path / "fail2").touch()  # rank 2's manager raises at its next round
        for viewer in on[2]:
            ended = await _ended(viewer)
            assert ended["type"] == "ended" and "replica 2 (rank 2) failed" in ended["reason"], ended
        assert processes[2].wait(timeout=30) == 0, "a failed replica reports it and leaves the job normally"
        processes[1].kill()
        for viewer in on[1]:
            ended = await _ended(viewer)
            assert ended["type"] == "ended" and "replica 1 (rank 1) failed" in ended["reason"], ended
        for viewer in on[0]:
            await viewer.read(6)  # replica 0 streams on
        fresh = await Viewer.open(url)
        assert fresh.hello["type"] == "session" and fresh.hello["replica"] == 0
        await fresh.read(3)
        await asyncio.gather(*(v.close() for v in on[0] + [fresh]))

    with ranks(command, world=3) as (url, processes):
        asyncio.run(run(url, processes))
        processes[0].send_signal(signal.SIGINT)
        assert processes[0].wait(timeout=60) == 0, processes[0].stdout.read()


def test_a_frozen_replica_is_ended_after_the_timeout(tmp_path):
    """A replica rank stopped by SIGSTOP (a hang, a debugger) says nothing: after --timeout its
    viewers are told and replica 0 streams on."""
    command = [sys.executable, str(WORKER), str(tmp_path), "--port", "0", "--timeout", "5"]

    async def run(url, processes):
        viewers = [await Viewer.open(url) for _ in range(2)]
        assert sorted(v.hello["replica"] for v in viewers) == [0, 1]
        for viewer in viewers:
            await viewer.read(3)
        os.kill(processes[1].pid, signal.SIGSTOP)
        (frozen,) = [v for v in viewers if v.hello["replica"] == 1]
        ended = await _ended(frozen)
        assert "replica 1 (rank 1) failed" in ended["reason"] and "Timed out" in ended["reason"], ended
        (alive,) = [v for v in viewers if v.hello["replica"] == 0]
        await alive.read(6)
        await alive.close()

    with ranks(command, world=2) as (url, processes):
        try:
            asyncio.run(run(url, processes))
        finally:
            os.kill(processes[1].pid, signal.SIGCONT)  # it finds its link gone and leaves (exit code 1)
        processes[0].send_signal(signal.SIGINT)
        assert processes[0].wait(timeout=60) == 0, processes[0].stdout.read()[-2000:]


def test_the_demo_model_on_two_replica_ranks(tmp_path):
    """`python -m engine.stream` under torchrun's environment: two viewers, one per replica, each
    its own video (different seeds); Ctrl-C on rank 0 ends both ranks with exit code 0."""
    command = [sys.executable, "-m", "launch.stream", "--preset", "demo", "--port", "0", "--timeout", "60",
               "--replicas", "2"]  # fmt: skip

    async def run(url):
        a, b = await Viewer.open(url), await Viewer.open(url)
        assert {a.hello["replica"], b.hello["replica"]} == {0, 1}, (a.hello, b.hello)
        await a.read(6, seconds=90)
        await b.read(6, seconds=90)
        first_a, first_b = a.frames[3].image().astype(int), b.frames[3].image().astype(int)
        assert abs(first_a - first_b).mean() > 1.0, "two sessions, two videos"
        await asyncio.gather(a.close(), b.close())

    with ranks(command, world=2, timeout=180) as (url, processes):
        asyncio.run(run(url))
        processes[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=60) for p in processes]
        assert codes == [0, 0], [p.stdout.read()[-2000:] for p in processes]


def _ranks_lines(stderr: str) -> list[str]:
    """stderr less torchrun's own: its agent's log lines and the traceback of the signal it got."""
    tail = stderr.rfind("Traceback (most recent call last):")
    if tail >= 0 and "SignalException" in stderr[tail:]:
        stderr = stderr[:tail]
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"[WIE]\d{4} .*torch/", line)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_through_torchrun_is_quiet(tmp_path, signum):
    """Ctrl-C (or SIGTERM) to torchrun, which passes it to every rank, with sessions open: the ranks
    stop without a failed replica or a traceback (the replica ranks wait for the serving rank)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path), "--port", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + 120, ""
        while "serving" not in line:
            line = job.stdout.readline()
            assert time.monotonic() < deadline and (line or job.poll() is None), "rank 0 never served"
        url = "ws://" + re.search(r"http://([\d.]+:\d+)", line).group(1) + "/ws"

        async def watch():
            viewers = [await Viewer.open(url) for _ in range(2)]  # a session on each replica
            for viewer in viewers:
                await viewer.read(3, seconds=60)

        asyncio.run(watch())
        job.send_signal(signum)
        _, stderr = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    lines = _ranks_lines(stderr)
    assert len(lines) <= 2 and not any("Traceback" in x or "failed" in x or "error" in x for x in lines), stderr
