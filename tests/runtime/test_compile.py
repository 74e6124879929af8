"""--compile: the denoiser's forward compiles whole-graph, a stream compiles a bounded number of
graphs (none once its window slides), compiled output equals eager, and the steady-state tick keeps
the invariants a CUDA-graph capture needs (checked here on CPU with tiny-wan).

Backends: the graph-break and recompile tests compile with dynamo's "eager" backend: dynamo traces
and guards the forward exactly as for inductor, without inductor's slow CPU code generation. The
graph inspection uses aot_autograd (the aten graph inductor would get), and one parity test
compiles with inductor, the backend --compile uses.

pytest tests/runtime/test_compile.py
"""

import contextlib
import dataclasses

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import ConfigError, SpeedConfig
from engine.runtime.compiled import FastForward
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from helpers import assert_close
from launch.build import build_session
from launch.presets import get_preset

CPU = torch.device("cpu")
TICKS = 20


def _session(compile: str = "off", backend: str = "eager", preset: str = "tiny-wan", **plan):
    """A tiny-wan session whose forward compiles with `backend` (the flags' path, backend swapped)."""
    chosen = get_preset(preset)
    chosen = dataclasses.replace(chosen, plan=dataclasses.replace(chosen.plan, **plan))
    session = build_session(chosen, WeightPaths(seed=3), CPU, torch.float32, speed=SpeedConfig(compile=compile))
    assembly = session.executors
    assembly.fast = FastForward(assembly.model, assembly.speed, assembly.fast.attention, backend=backend)
    assembly.runner = assembly.fast
    return session


def _fresh_counters() -> None:
    torch._dynamo.reset()
    counters.clear()


def _stream(session, ticks: int) -> tuple[torch.Tensor, list[int]]:
    """An endless stream run for `ticks` ticks: (latents of its finished blocks, graphs compiled
    so far after each tick)."""
    executor = session.executors(NoiseSource(0), blocks_in_forward=_in_forward(session))
    text, finished, graphs = session.prompts.conditioning("a red circle"), [], []
    executor.start()
    for tick, _ in zip(session.plan(None), range(ticks)):
        with torch.no_grad():
            finished += [block.latents for block in executor.step(tick, text)]
        graphs.append(counters["stats"]["unique_graphs"])
    return torch.cat(finished, dim=2), graphs


def _in_forward(session) -> int:
    from engine.plan.timeline import blocks_per_tick

    plan = session.preset.plan
    return blocks_per_tick(session.schedule, None if plan.schedule == "sequential" else plan.offset, None)


@pytest.mark.parametrize(
    "preset, plan, bound",
    [
        ("tiny-wan", {}, 3),
        ("tiny-wan", {"schedule": "pyramid", "offset": 1}, 8),
        ("tiny-wan", {"schedule": "pyramid", "offset": 1, "context": "lagged"}, 24),
        ("magi-1-tiny", {}, 12),
    ],
    ids=["sequential", "pyramid", "pyramid-lagged", "magi-sequential"],
)
def test_a_stream_compiles_few_graphs_and_none_once_the_window_slides(preset, plan, bound):
    """No graph breaks; the graphs a 20-tick stream compiles are the layouts of its window filling
    (committed frames x blocks in flight; MAGI-1: x its per-stage KV reach); its last ticks
    compile none. Output equals eager."""
    eager, _ = _stream(_session(preset=preset, **plan), TICKS)
    _fresh_counters()
    compiled, graphs = _stream(_session("default", preset=preset, **plan), TICKS)
    assert not counters["graph_break"], dict(counters["graph_break"])
    print(f"{preset} {plan}: graphs after each tick {graphs}")
    assert graphs[-1] <= bound, f"{graphs[-1]} graphs compiled in {TICKS} ticks (bound {bound}): {graphs}"
    assert graphs[-6] == graphs[-1], f"the steady state recompiles: graphs after each tick {graphs}"
    assert_close(compiled, eager, 1e-5, "compiled (dynamo, eager backend) vs eager latents")


def test_the_forward_traces_as_one_graph_through_the_cache_view():
    """torch._dynamo.explain over one forward through an InFlightView with committed context and
    a block mask: one graph, no breaks."""
    session = _session()
    executor = session.executors(NoiseSource(0), blocks_in_forward=2)
    text = session.prompts.conditioning("a red circle")
    executor.start()
    ticks = iter(session.plan(None))
    for tick in ticks:  # past the first block, so the forward has committed context
        executor.step(tick, text)
        if executor.cache.committed:
            break
    view = executor.cache.view(first_frame=executor.cache.committed, frames=3, block_frames=3, mode="causal")
    x = torch.randn(session.preset.latent_shape(3))
    explained = torch._dynamo.explain(session.model)(x, torch.full((1, 3), 0.5, dtype=torch.float64), text, view)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (item(), bool(), int(): aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_steady_state_tick_is_graph_ready():
    """What capturing the steady-state tick as a CUDA graph needs, checked on CPU: the tick reads
    no tensor value into Python (no host sync; its branches are on host integers), writes into
    the KV buffers allocated when the stream started, and the compiled forward's aten graph
    holds no scalar read-back."""
    session = _session()
    executor = session.executors(NoiseSource(0), blocks_in_forward=1)
    text = session.prompts.conditioning("a red circle")
    executor.start()
    buffers = [(t.data_ptr(), t.shape) for t in (executor.cache.k, executor.cache.v)]
    reads = _ScalarReads()
    for index, tick in zip(range(TICKS), session.plan(None)):
        with torch.no_grad(), reads if index >= TICKS // 2 else contextlib.nullcontext():
            executor.step(tick, text)
    assert not reads.reads, f"steady-state ticks read tensors back: {reads.reads[:5]}"
    assert [(t.data_ptr(), t.shape) for t in (executor.cache.k, executor.cache.v)] == buffers

    graphs = []
    inspect = aot_autograd(fw_compiler=lambda gm, _: graphs.append(gm) or gm.forward)
    _fresh_counters()
    compiled = FastForward(session.model, SpeedConfig(compile="default"), session.executors.fast.attention, inspect)
    session.executors.fast, session.executors.runner = compiled, compiled
    _stream(session, TICKS)
    assert graphs, "nothing was compiled"
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    reads = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default"}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in targets, "not the forward's graph"
    assert not targets & reads, sorted(targets & reads)


def test_graphs_mode_marks_the_kv_buffers_static():
    """CUDA graphs write the KV cache in place: its buffers are fixed-address inputs."""
    session = _session()  # graphs mode itself is refused on CPU (test_cli_flags); its cache step is not
    graphs = FastForward(session.model, SpeedConfig(compile="graphs"), session.executors.fast.attention, "eager")
    session.executors.fast = graphs
    executor = session.executors(NoiseSource(0), blocks_in_forward=1)
    assert getattr(executor.cache.k, "_dynamo_static_input_type", None) is not None
    assert getattr(executor.cache.v, "_dynamo_static_input_type", None) is not None


def test_compile_is_refused_where_the_forward_cannot_be_one_graph():
    """Feature caches that read layer outputs through hooks: refused with the reason, one line."""
    preset = get_preset("tiny-wan")
    preset = dataclasses.replace(preset, cache=dataclasses.replace(preset.cache, policy="bwcache", threshold=0.1))
    with pytest.raises(ConfigError, match="--compile") as refused:
        build_session(preset, WeightPaths(seed=3), CPU, torch.float32, speed=SpeedConfig(compile="default"))
    assert "\n" not in str(refused.value)


def test_inductor_compiled_stream_matches_eager():
    """--compile default as shipped (inductor): the first blocks of a stream equal eager's."""
    eager, _ = _stream(_session(), 10)
    _fresh_counters()
    compiled, graphs = _stream(_session("default", backend="inductor"), 10)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_close(compiled, eager, 1e-4, "inductor-compiled vs eager latents")


def test_the_python_api_takes_the_speed_options():
    """StreamingPipeline.from_preset(compile=, kv_cache=, attention=) reaches the session's forward."""
    from launch.pipeline import StreamingPipeline

    pipe = StreamingPipeline.from_preset("tiny-wan", random_weights=True, device="cpu", compile="default",
                                         attention="math")  # fmt: skip
    assert "compiled" in pipe.speed_line and "math" in pipe.speed_line, pipe.speed_line
    with pytest.raises(ConfigError, match="compile must be one of"):
        StreamingPipeline.from_preset("tiny-wan", random_weights=True, device="cpu", compile="fast")
