"""How the in-flight blocks of a tick see each other: the context part of the executor.

* `Joint`: one forward over the tick's computed blocks; every in-flight block is seen with its
  K/V of this very tick (skipped blocks: of their last computed step). On ranks, the placement
  gathers each layer's K/V, so N ranks equal one device.
* `Lagged`: one forward per computed block; the other in-flight blocks are seen with their K/V
  as of the previous tick, so K/V travel once per tick and the transfer overlaps the solver step
  and decoding. On one device this is the reference a cascade must reproduce exactly:
  - tick t, block b: keys = [committed context | neighbours' tick t-1 K/V | b's own K/V now], in
    block order; a neighbour that started at tick t has no K/V yet and is left out;
  - after the tick every block's fresh K/V replace the previous ones, and blocks whose commit
    pass ran append their clean K/V to the cache (before the next tick's forwards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.plan.timeline import Tick
from engine.runtime.outputs import BlockKV
from engine.runtime.skip import Member
from engine.runtime.views import InFlightView, LayerKV


class Joint:
    records = False

    def settle(self, ex) -> None:
        pass

    def drain(self, ex) -> None:
        pass

    def open(self, ex, tick: Tick, run: list[Member]) -> InFlightView:
        """The view of the tick's one forward over the `run` members (the executor, or a coalesced
        forward of many streams, runs it; `close` then keeps and commits)."""
        computed = [b for b, _, _ in run]
        plain = not ex.records and not ex.placement.exchanges_every_layer
        present = computed if plain else tick.blocks
        commits = sum(1 for w in tick.work if w.commit)
        fill = None if plain else _gathered(ex, tick.blocks)
        return InFlightView(ex.cache, present, computed, ex.frames_per_block, ex.attention, commits=commits,
                            reach=ex.reach(tick, present), fill=fill, record=ex.records)  # fmt: skip

    def close(self, ex, view: InFlightView) -> None:
        """After the forward: keep the K/V skipped blocks are seen through; commit finished blocks."""
        ex.keep(view.recorded())
        view.commit()

    def forward(self, ex, tick: Tick, run: list[Member], text) -> dict[int, torch.Tensor]:
        view = self.open(ex, tick, run)
        if not run and not ex.placement.exchanges_every_layer:
            return {}
        if run:
            flows = ex.forward(run, text, view)
        else:  # a rank with nothing to compute still joins the exchange (and commits)
            cfg = ex.model.cfg
            view.exchange_only(cfg.num_layers, ex.cache.k.shape[1], cfg.kv_heads, cfg.head_dim)
            flows = {}
        self.close(ex, view)
        return flows


def _gathered(ex, blocks: list[int]) -> Callable[[int, dict[int, LayerKV]], dict[int, LayerKV]]:
    """fill() for a joint view: this process's blocks (fresh if computed, else their last K/V),
    then the placement's exchange for everyone's."""

    def fill(layer: int, fresh: dict[int, LayerKV]) -> dict[int, LayerKV]:
        mine = {b: fresh[b] if b in fresh else ex.inflight[b].layer(layer) for b in blocks if ex.placement.owns(b)}
        return ex.placement.gather_layer(layer, blocks, mine)

    return fill


class Lagged:
    records = True

    def __init__(self):
        self._pending: tuple[Tick, Callable[[], dict[int, BlockKV]]] | None = None

    def forward(self, ex, tick: Tick, run: list[Member], text) -> dict[int, torch.Tensor]:
        flows, fresh = {}, {}
        for member in run:
            block = member[0]
            present = [b for b in tick.blocks if b == block or b in ex.inflight]
            fill = lambda layer, _, own=block, seen=present: {  # noqa: E731
                b: ex.inflight[b].layer(layer) for b in seen if b != own
            }
            view = InFlightView(ex.cache, present, [block], ex.frames_per_block, ex.attention,
                                reach=ex.reach(tick, present), fill=fill, record=True)  # fmt: skip
            flows.update(ex.forward([member], text, view))
            fresh.update(view.recorded())
        mine = {b: fresh[b] if b in fresh else ex.inflight[b] for b in tick.blocks if ex.placement.owns(b)}
        self._pending = (tick, ex.placement.exchange_tick(tick.blocks, mine))
        return flows

    def settle(self, ex) -> None:
        """Take in the last tick's K/V (waiting for peers if they travel), then commit finished
        blocks in block order: before this tick's forwards, which attend to them."""
        if self._pending is None:
            return
        tick, wait = self._pending
        self._pending = None
        received = wait()
        ex.inflight.update(received)
        for work in tick.work:
            if work.commit:
                kv = ex.inflight.pop(work.block)
                ex.cache.append(work.block * ex.frames_per_block, kv.keys, kv.values)

    def drain(self, ex) -> None:
        self.settle(ex)
