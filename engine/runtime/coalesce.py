"""Many streams' ticks together: `step_together` runs one tick of several executors.

Its result equals `[ex.step(tick, text) for ex, tick, text in items]`: each executor's finished
blocks, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.plan.timeline import Tick
from engine.runtime.executor import Executor
from engine.runtime.outputs import Block


def step_together(items: Sequence[tuple[Executor, Tick, object]]) -> list[list[Block]]:
    """One tick of each (executor, tick, text): every executor's finished blocks, in item order."""
    return [executor.step(tick, text) for executor, tick, text in items]
