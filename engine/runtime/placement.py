"""Where a stream's blocks run: all on this process (`Local`), or spread over ranks.

The executor asks its placement which blocks this process computes and hands it the K/V it must
share. On one process every exchange is the identity; parallel/cascade.py supplies a placement
whose exchanges are collectives over a cascade group. Nothing else of the loop changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from engine.plan.timeline import Tick
from engine.runtime.outputs import Block, BlockKV
from engine.runtime.views import LayerKV


class Placement(Protocol):
    exchanges_every_layer: bool
    """A process with nothing to compute in a tick still takes part in every layer's exchange."""

    def owns(self, block: int) -> bool:
        """Whether this process denoises `block`."""
        ...

    def on_tick(self, tick: Tick) -> None:
        """Called once at the start of every tick (liveness reports)."""
        ...

    def gather_layer(self, layer: int, blocks: list[int], mine: dict[int, LayerKV]) -> dict[int, LayerKV]:
        """Joint context: every in-flight block's K/V at `layer`, given this process's own."""
        ...

    def exchange_tick(self, blocks: list[int], mine: dict[int, BlockKV]) -> Callable[[], dict[int, BlockKV]]:
        """Lagged context: start sharing this tick's K/V; the returned call waits for every block's."""
        ...

    def deliver(self, executor, tick: Tick, finished: list[Block]) -> Iterator[Block]:
        """Finished blocks where the stream's output is (in order), nothing elsewhere."""
        ...


class Local:
    """Every block on this process: nothing to exchange."""

    exchanges_every_layer = False

    def owns(self, block: int) -> bool:
        return True

    def on_tick(self, tick: Tick) -> None:
        pass

    def gather_layer(self, layer: int, blocks: list[int], mine: dict[int, LayerKV]) -> dict[int, LayerKV]:
        return mine

    def exchange_tick(self, blocks: list[int], mine: dict[int, BlockKV]) -> Callable[[], dict[int, BlockKV]]:
        return lambda: mine

    def deliver(self, executor, tick: Tick, finished: list[Block]) -> Iterator[Block]:
        yield from finished
