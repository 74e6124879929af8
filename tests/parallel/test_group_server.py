"""The sessions server on rank groups, end to end with the demo model (gloo on loopback): the
mission's command serves several viewers, each its own prompt, through a 5-rank cascade; with
two groups, a frozen or failing rank ends only its own group's sessions, naming the rank.

    pytest tests/parallel/test_group_server.py

The ranks are plain processes with torchrun's environment (tests/parallel/test_replicas.py `ranks`):
under torchrun itself a rank killed by the test would take the job down, which is torchrun's
choice, not the engine's. Every rank runs tests/support/group_server_worker.py (the real entry point's
sessions path; admission by memory only, so which viewers get in does not depend on how loaded
this machine is).
"""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_replicas import ranks

from engine.demo.scenes import parse_prompt
from engine.eval.adherence import adherence, read_video
from tests.serving.test_serve_sessions import Viewer

WORKER = Path(__file__).parents[1] / "support" / "group_server_worker.py"
PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right")
BLOCK = 3  # pixel frames per block of the demo preset


def _command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(WORKER), str(out), "--preset", "demo", "--port", "0", *flags]


async def _own_prompt(viewer: Viewer, prompt: str) -> int:
    """Switch the viewer's session to `prompt` (even the one it has); the prompt version its frames
    then carry."""
    reply = await viewer.ask({"type": "prompt", "text": prompt})
    assert reply["type"] == "ack" and reply["of"] == "prompt", reply
    return reply["version"]


def _shows(frames, prompt: str) -> dict:
    video = np.stack([f.image() for f in frames])
    return adherence(video, parse_prompt(prompt))


@pytest.mark.timeout(900)  # 5 ranks and 3 sessions on 2 cores: about 3 minutes when quiet
def test_the_mission_command_serves_viewers_through_a_five_rank_cascade(tmp_path):
    """`torchrun --nproc_per_node=5 -m engine.stream`: one group of 5 ranks running the cascade plan
    (offset 1, the default for a group of stages), three viewers, each its own session and prompt;
    each video shows its own prompt's color, and frames arrive in order."""

    async def run(url, processes):
        viewers = [await Viewer.open(url) for _ in PROMPTS]
        hellos = [v.hello for v in viewers]
        assert all(h["type"] == "session" and h["replica"] == 0 for h in hellos), hellos
        assert len({v.hello["id"] for v in viewers}) == 3
        versions = [await _own_prompt(v, p) for v, p in zip(viewers, PROMPTS)]
        for viewer, version in zip(viewers, versions):
            while len([f for f in viewer.frames if f.prompt_version == version]) < 5 * BLOCK:
                await viewer.read(BLOCK, seconds=240)
        for viewer, version, prompt in zip(viewers, versions, PROMPTS):
            indices = [f.index for f in viewer.frames]
            assert indices == sorted(indices) and len(set(indices)) == len(indices), indices
            after = [f for f in viewer.frames if f.prompt_version == version][2 * BLOCK :]
            scores = _shows(after, prompt)
            assert scores["color"], (prompt, scores, read_video(np.stack([f.image() for f in after])))
        await asyncio.gather(*(v.close() for v in viewers))

    command = _command(tmp_path, "--timeout", "120")
    with ranks(command, world=5, timeout=300) as (url, processes):
        asyncio.run(run(url, processes))
        # engine.client, unchanged, against the group: a session of its own and a switch it sees
        client = subprocess.run([sys.executable, "-m", "engine.client", "--url", url, "--prompt", PROMPTS[1],
                                 "--prompt2", PROMPTS[2], "--switch-after", "4", "--seconds", "14"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert client.returncode == 0, client.stderr[-2000:]
        assert "session " in client.stdout and "prompt version 3 on screen" in client.stdout, client.stdout
        processes[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=90) for p in processes]
        assert codes == [0] * 5, [p.stdout.read()[-2000:] for p in processes]


async def _ended(viewer: Viewer, seconds: float) -> dict:
    from websockets.exceptions import ConnectionClosed

    with pytest.raises(ConnectionClosed):
        while True:
            await viewer.read(10**6, seconds=seconds)
    return viewer.replies[-1]


@pytest.mark.parametrize("fault", ["freeze", "raise"])
def test_a_frozen_or_failing_rank_ends_only_its_groups_sessions(tmp_path, fault):
    """4 ranks as 2 groups of a 2-rank cascade; rank 3 (group 1's follower) freezes (SIGSTOP) or
    raises: group 1's viewer is told, naming rank 3, within the timeout; group 0's streams on."""
    timeout = 8

    async def run(url, processes):
        viewers = [await Viewer.open(url) for _ in range(2)]
        by_group = {v.hello["replica"]: v for v in viewers}
        assert sorted(by_group) == [0, 1], [v.hello for v in viewers]
        for viewer in viewers:
            await viewer.read(BLOCK, seconds=180)
        if fault == "freeze":
            os.kill(processes[3].pid, signal.SIGSTOP)
        else:
            (tmp_path / "fail3").touch()
        ended = await _ended(by_group[1], seconds=timeout + 60)
        assert ended["type"] == "ended" and "replica 1 (ranks 2-3) failed" in ended["reason"], ended
        assert "rank 3" in ended["reason"], ended
        if fault == "raise":
            assert "injected failure on rank 3" in ended["reason"], ended
        await by_group[0].read(4 * BLOCK, seconds=120)  # group 0 streams on
        await by_group[0].close()

    command = _command(tmp_path, "--schedule", "cascade", "--offset", "1", "--replicas", "2",
                       "--timeout", str(timeout))  # fmt: skip
    with ranks(command, world=4, timeout=300) as (url, processes):
        try:
            asyncio.run(run(url, processes))
        finally:
            os.kill(processes[3].pid, signal.SIGCONT)
            if fault == "freeze":
                processes[3].kill()  # frozen mid-collective: its peers left; nothing to finish
        processes[0].send_signal(signal.SIGINT)
        assert processes[0].wait(timeout=90) == 0, processes[0].stdout.read()[-2000:]
        for rank in (1, 2):  # group 0's follower is told to stop; group 1's leader reported and left
            assert processes[rank].wait(timeout=90) == 0, processes[rank].stdout.read()[-2000:]
