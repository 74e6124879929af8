"""What viewers ask reaches every rank intact; a live stream keeps to its playback rate.

    pytest tests/serving/test_controls.py

The multi-rank case is a `torchrun --standalone` launch of tests/support/control_worker.py (gloo on the
loopback interface) under an outer timeout.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.serving.controls import Controls, ControlState, pack, share, unpack
from engine.serving.live import LiveStream, OneProcess
from engine.serving.protocol import MAX_PROMPT_BYTES, ProtocolError, clean_prompt, parse_control

WORKER = Path(__file__).parents[1] / "support" / "control_worker.py"
EMOJI = "\U0001f642"
# accepted prompts at the edges: 500 emoji (4 bytes each), 1000 two-byte letters, CJK, mixed
EDGE_PROMPTS = [EMOJI * 500, "é" * 1000, "x" * MAX_PROMPT_BYTES, "漢字" * 333, f"a {EMOJI} b\tc\nd"]


def _prompt_message(text: str) -> str:
    return json.dumps({"type": "prompt", "text": text}, ensure_ascii=False)  # as browsers send it


# -- the validator and the packet agree ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(exclude_categories=()), max_size=700))
def test_every_prompt_the_validator_accepts_survives_the_packet(text):
    """Surrogates included (JSON can spell them): accepted means it packs, and unpacks the same."""
    try:
        accepted = parse_control(_prompt_message(text)).text
    except ProtocolError:
        with pytest.raises(ProtocolError):
            Controls("start").request_prompt(text)  # refused the same way wherever it enters
        return
    state = ControlState(accepted, 7, False, False)
    assert unpack(pack(state)) == state


def test_prompts_at_the_limit():
    for text in EDGE_PROMPTS:
        state = ControlState(clean_prompt(text), 1, True, False)
        assert unpack(pack(state)) == state
    with pytest.raises(ProtocolError, match="bytes of UTF-8"):
        parse_control(_prompt_message(EMOJI * 501))
    with pytest.raises(ProtocolError, match="lone surrogate"):
        parse_control('{"type": "prompt", "text": "a \\ud800"}')


def test_one_process_shares_through_the_packet():
    controls = Controls("a red circle moving left")
    controls.request_prompt(EMOJI * 500)
    controls.set_paused(True)
    assert share(controls, OneProcess()) == ControlState(EMOJI * 500, 1, True, False)


@pytest.mark.parametrize("ranks, decode_rank", [(2, False), (3, True)])
def test_accepted_prompts_reach_every_rank(tmp_path, ranks, decode_rank):
    """A real gloo job: the serving rank shares each edge prompt; every rank must get it intact."""
    prompts = [clean_prompt(t) for t in EDGE_PROMPTS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    command = ["timeout", "-k", "5", "150", sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", str(WORKER), str(tmp_path)]  # fmt: skip
    command += ["--decode-rank"] if decode_rank else []
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(ranks):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["prompts"] == prompts, f"rank {rank}"
        if rank < ranks - int(decode_rank):
            assert seen["cascade_group_timeout_s"] == pytest.approx(7.0), "the compute group has the job's timeout"


# -- prompts sent while paused --------------------------------------------------------------------


def test_prompts_sent_while_paused_take_no_memory():
    controls = Controls("a red circle moving left")
    controls.set_paused(True)
    for i in range(10_000):
        controls.request_prompt(f"prompt number {i}")
    assert len(controls.requested_at) == 1, "only the latest prompt is kept"
    assert controls.snapshot().prompt == "prompt number 9999"


# -- pacing ----------------------------------------------------------------------------------------


class _InstantSource:
    """Blocks of `frames` frames as fast as asked: only pacing holds the stream back."""

    def __init__(self, frames: int):
        self.latents = torch.zeros(1, 3, frames, 4, 4)

    def __call__(self, prompt_for):
        block = 0
        while True:
            prompt_for(SimpleNamespace(work=[SimpleNamespace(block=block, step=0)]))
            yield SimpleNamespace(index=block, latents=self.latents)
            block += 1


class _Identity:
    def reset(self):
        pass

    def decode(self, latents):
        return latents


def test_a_pause_is_not_made_up_by_running_fast():
    """After a 2 s pause a 20 fps stream must not send 2 s of frames at once: in the second after
    resuming, at most a second's frames plus a block or two of catching up (only an upper bound:
    a busy machine can only send fewer)."""
    fps, block = 20, 2
    controls = Controls("a red circle moving left")
    sent: list[float] = []
    stream = LiveStream(_InstantSource(block), _Identity(), controls, steps=1, fps=fps, pace=True,
                        on_frames=lambda frames, *rest: sent.extend([time.perf_counter()] * len(frames)))  # fmt: skip
    thread = threading.Thread(target=stream.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        controls.set_paused(True)
        time.sleep(2.0)
        resumed = time.perf_counter()
        controls.set_paused(False)
        time.sleep(1.5)
    finally:
        controls.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    after = [t for t in sent if resumed <= t < resumed + 1.0]
    assert len(after) <= fps + 3 * block, f"{len(after)} frames in the second after a pause at {fps} fps"
