"""Many streams in shared forwards, and suspending a stream: each stream's blocks are those it
makes alone, whoever shares its ticks, and a stream suspended at any tick continues exactly.

    pytest tests/runtime/test_coalesce.py
"""

from __future__ import annotations

import dataclasses
import gc
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from engine.config import SpeedConfig
from engine.models.wan import TextKV
from engine.plan.sigmas import Schedule
from engine.plan.timeline import Tick, blocks_per_tick
from engine.runtime.coalesce import SharedCalls, shareable, step_together
from engine.runtime.executor import Executor
from engine.runtime.offload import state_tensors
from engine.runtime.session import Session
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import EAGER, build_session
from launch.presets import get_preset

CPU = torch.device("cpu")
TOLERANCE = {"tiny-wan": 1e-5, "demo": 5e-4}
"""Whole streams, coalesced vs alone. One shared forward is within 1e-5 of the same forward alone
(test_one_shared_forward_equals_each_alone): the batch size changes which float32 kernels run,
so results differ in the last bits. The trained demo model carries such differences from step to
step and block to block through its KV cache: perturbing a solo stream's starting noise by one
part in 1e7 moves its blocks by 7e-6 .. 3e-5 within 4 blocks, so its bound is wider."""


def _session(name: str, speed: SpeedConfig = EAGER, **changes) -> Session:
    preset = get_preset(name)
    parts = {k: dataclasses.replace(getattr(preset, k), **v) for k, v in changes.items()}
    return build_session(dataclasses.replace(preset, **parts), WeightPaths(seed=3), CPU, torch.float32, speed=speed)


def _variant(session: Session, **changes) -> Session:
    """The same loaded model under another plan, sampling or cache setting."""
    preset = session.preset
    parts = {k: dataclasses.replace(getattr(preset, k), **v) for k, v in changes.items()}
    return session.reconfigured(dataclasses.replace(preset, **parts))


@dataclass
class Stream:
    """One viewer's stream: joins at global tick `join`, runs `ticks` of its own plan."""

    session: Session
    seed: int
    join: int
    ticks: int
    prompt: Callable[[int], str]  # of the stream's own tick index

    def executor(self) -> tuple[Executor, list[Tick]]:
        plan = self.session.preset.plan
        offset = None if plan.schedule == "sequential" else plan.offset
        in_forward = blocks_per_tick(self.session.schedule, offset, 16)
        executor = self.session.executors(NoiseSource(self.seed), blocks_in_forward=in_forward)
        return executor, list(self.session.plan(16))[: self.ticks]

    def text(self, tick: Tick):
        return self.session.prompts.conditioning(self.prompt(tick.index))


def _alone(stream: Stream) -> tuple[list, Executor]:
    executor, ticks = stream.executor()
    blocks = [block for tick in ticks for block in executor.step(tick, stream.text(tick))]
    return blocks, executor


def _together(streams: list[Stream], calls: SharedCalls) -> tuple[list[list], list[Executor]]:
    """Every stream stepped in global ticks: those in their window share each step_together."""
    runs = [stream.executor() for stream in streams]
    blocks: list[list] = [[] for _ in streams]
    for now in range(max(s.join + s.ticks for s in streams)):
        due = [i for i, s in enumerate(streams) if s.join <= now < s.join + s.ticks]
        items = [(runs[i][0], runs[i][1][now - streams[i].join], streams[i].text(runs[i][1][now - streams[i].join]))
                 for i in due]  # fmt: skip
        for i, finished in zip(due, step_together(items, calls)):
            blocks[i] += finished
    return blocks, [executor for executor, _ in runs]


class Calls:
    """Counts the model's forward calls (a forward pre-hook: the model stays untouched)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1


def _viewers(session: Session) -> list[Stream]:
    """Four viewers: different seeds and prompts, joining at different ticks, prompt switches at
    different ticks, one leaving early, one with flowcache reusing, one on a pyramid plan."""
    flowcache = _variant(session, cache=dict(policy="flowcache", threshold=1.5))
    pyramid = _variant(session, plan=dict(schedule="pyramid", offset=1))
    return [
        Stream(session, 0, 0, 22, lambda t: "a red circle moving left" if t < 7 else "a blue square moving up"),
        Stream(flowcache, 1, 2, 20, lambda t: "a green triangle bouncing"),
        Stream(session, 2, 5, 9, lambda t: "a white square moving down" if t < 4 else "a cyan circle moving right"),
        Stream(pyramid, 3, 1, 12, lambda t: "a yellow circle moving up" if t < 9 else "a red square moving left"),
    ]


MEMORY_OPTIONS = SpeedConfig(weights="fp8", offload="layers", text_encoder_device="swap")
"""Every option that makes a preset fit a smaller device (engine/runtime/memory_options.py)."""


@pytest.mark.parametrize(
    "name, speed",
    [
        pytest.param("tiny-wan", EAGER, id="tiny-wan"),
        pytest.param("demo", EAGER, id="demo"),
        pytest.param("tiny-wan", MEMORY_OPTIONS, id="tiny-wan-fp8-weights-offload-swap"),
    ],
)
def test_streams_in_shared_forwards_equal_each_stream_alone(name, speed):
    session = _session(name, speed)
    streams = _viewers(session)
    if name == "tiny-wan":  # classifier-free guidance: two samples of the shared batch
        streams.append(Stream(_variant(session, sampling=dict(guidance_scale=3.0)), 4, 3, 15, lambda t: "a square"))
    counter = Calls(session.model)
    alone = [_alone(stream) for stream in streams]
    calls_alone, counter.count = counter.count, 0
    calls = SharedCalls()
    together, executors = _together(streams, calls)
    for i, ((expected, solo), got, executor) in enumerate(zip(alone, together, executors)):
        assert [b.index for b in got] == [b.index for b in expected], f"stream {i}: blocks differ"
        for a, e in zip(got, expected):
            assert_close(a.latents, e.latents, TOLERANCE[name], f"{name} stream {i} block {a.index}")
        assert executor.stats.forwards == solo.stats.forwards and executor.stats.skip == solo.stats.skip
    assert alone[1][1].stats.skip["reused"] > 0, "the flowcache stream must reuse for this test to mean anything"
    assert counter.count == calls.calls < calls_alone, (counter.count, calls, calls_alone)
    assert calls.forwards == calls_alone and calls.widest >= 3, calls


@torch.no_grad()
def test_one_shared_forward_equals_each_alone():
    """One tick of three demo streams, one of them with a committed block (longer keys: padded,
    with a per-sample mask) and one guided: every stream's new latents within 1e-5 of its own."""
    session = _session("demo")
    guided = _variant(session, sampling=dict(guidance_scale=2.0))
    streams = [Stream(session, 0, 0, 6, lambda t: "a red circle"), Stream(session, 1, 0, 6, lambda t: "a blue square"),
               Stream(guided, 2, 0, 6, lambda t: "a green triangle")]  # fmt: skip
    made = [[s.executor() for s in streams] for _ in range(2)]
    for executor, ticks in (made[0][0], made[1][0]):  # stream 0 runs a block ahead, identically in both
        for tick in ticks[:5]:
            executor.step(tick, streams[0].text(tick))
    first = [5, 0, 0]
    for (executor, ticks), stream, k in zip(made[0], streams, first):
        executor.step(ticks[k], stream.text(ticks[k]))
    calls = SharedCalls()
    step_together([(ex, ticks[k], s.text(ticks[k])) for (ex, ticks), s, k in zip(made[1], streams, first)], calls)
    assert calls.calls == 1 and calls.widest == 3, calls
    for i, ((alone, _), (shared, _)) in enumerate(zip(*made)):
        assert alone.noisy.keys() == shared.noisy.keys()
        for block in alone.noisy:
            assert_close(shared.noisy[block], alone.noisy[block], 1e-5, f"stream {i} block {block}")


def test_parts_that_cannot_share_run_alone_unchanged():
    """Lagged context and a policy that taps layer features (bwcache) keep their forwards to
    themselves inside a shared tick: their blocks are exactly their solo blocks."""
    session = _session("tiny-wan")
    lagged = _variant(session, plan=dict(schedule="pyramid", offset=1, context="lagged"))
    bwcache = _variant(session, cache=dict(policy="bwcache", threshold=0.5))
    streams = [Stream(lagged, 0, 0, 12, lambda t: "a red circle"), Stream(bwcache, 1, 0, 12, lambda t: "a red circle"),
               Stream(session, 2, 0, 12, lambda t: "a blue square")]  # fmt: skip
    assert [shareable(s.executor()[0]) for s in streams] == [False, False, True]
    alone = [_alone(stream)[0] for stream in streams]
    calls = SharedCalls()
    together, _ = _together(streams, calls)
    for i, (expected, got) in enumerate(zip(alone, together)):
        assert len(got) == len(expected) > 0
        for a, e in zip(got, expected):
            assert torch.equal(a.latents, e.latents), f"stream {i} block {a.index}"
    assert calls.widest == 1, calls


def test_an_executor_takes_one_tick_at_a_time():
    session = _session("tiny-wan")
    stream = Stream(session, 0, 0, 2, lambda t: "a red circle")
    executor, ticks = stream.executor()
    with pytest.raises(ValueError, match="twice"):
        step_together([(executor, ticks[0], stream.text(ticks[0]))] * 2)


# -- suspend / resume ----------------------------------------------------------------------------


PYRAMID_FLOWCACHE = dict(plan=dict(schedule="pyramid", offset=1), cache=dict(policy="flowcache", threshold=1.5))
SKYREELS_LAGGED = dict(
    plan=dict(
        schedule="pyramid", offset=1, compute="selective", context="lagged", segment_frames=None, overlap_frames=0
    )
)
SUSPENDED = {
    # pyramid + flowcache reusing: several noisy blocks, kept in-flight K/V, policy outputs
    "pyramid-flowcache": ("tiny-wan", {}, PYRAMID_FLOWCACHE),
    # UniPC history per block, two guidance branches, lagged context's pending K/V
    "skyreels-lagged": ("skyreels-v2-df-tiny", {}, SKYREELS_LAGGED),
    # recache switch: the clean history it reruns; a prompt switch mid-stream
    "recache": ("tiny-wan", dict(stream=dict(sink_frames=0)), dict(plan=dict(switch="recache"))),
}


@pytest.mark.parametrize("case", sorted(SUSPENDED))
def test_a_stream_suspended_at_every_tick_continues_exactly(case):
    """Suspend and resume between every two ticks, and poison (NaN) every tensor the stream held
    before each suspend: nothing may still read them. The blocks equal an uninterrupted run."""
    name, build, variant = SUSPENDED[case]
    session = _variant(_session(name, **build), **variant)
    stream = Stream(session, 7, 0, 22, lambda t: "a red circle moving left" if t < 8 else "a blue square moving up")
    expected = [b.latents.clone() for b in _alone(stream)[0]]
    executor, ticks = stream.executor()
    got, moved = [], []
    for tick in ticks:
        got += [b.latents.clone() for b in executor.step(tick, stream.text(tick))]
        held = state_tensors(executor.stream_state())
        moved.append(executor.suspend())
        with pytest.raises(RuntimeError, match="suspended"):
            executor.step(tick, stream.text(tick))
        for tensor in held:
            tensor.fill_(float("nan"))  # the device copies are gone as far as the stream knows
        assert executor.resume() == moved[-1]
    assert len(got) == len(expected) > 0
    for b, (a, e) in enumerate(zip(got, expected)):
        assert torch.equal(a, e), f"{case}: block {b} max diff {(a - e).abs().max():.3g}"
    kv_bytes = executor.cache.nbytes
    assert min(moved) >= kv_bytes and max(moved) > kv_bytes, (moved, kv_bytes)


def _reachable_tensors(root, shared: tuple) -> dict[int, torch.Tensor]:
    """Every tensor an object graph reaches (gc referents), not looking inside `shared` objects,
    modules, classes or functions' globals (a function is followed into its closure only)."""
    found, seen, todo = {}, set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, torch.nn.Module, *shared)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, types.FunctionType):
            todo.extend(cell.cell_contents for cell in obj.__closure__ or ())
        elif isinstance(obj, types.MethodType):
            todo.append(obj.__self__)
        else:
            todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("case", sorted(SUSPENDED))
def test_suspend_moves_every_tensor_the_stream_holds(case):
    """After a suspend, every tensor the executor reaches (the model, rotary tables, prompt K/V
    and the schedule aside: shared by all streams) is one of the host copies it made."""
    name, build, variant = SUSPENDED[case]
    session = _variant(_session(name, **build), **variant)
    stream = Stream(session, 7, 0, 13, lambda t: "a red circle moving left" if t < 8 else "a blue square moving up")
    executor, ticks = stream.executor()
    for tick in ticks:
        executor.step(tick, stream.text(tick))
    assert executor.noisy and executor.cache.committed > 0  # mid-stream: there is state to move
    executor.suspend()
    moved = {id(t) for t in state_tensors(executor.stream_state())}
    shared = (type(executor.rope), TextKV, Schedule)
    left = [tuple(t.shape) for i, t in _reachable_tensors(executor, shared).items() if i not in moved]
    assert not left, f"{case}: tensors not moved by suspend: {left}"
