"""Block Cascading: the blocks of one stream denoise at once, each in-flight block on its own rank.

A pyramid plan keeps several blocks in flight; cascade rank r denoises blocks b with b mod C = r
(several per rank when more blocks are in flight than ranks). Every rank holds the model, and
the committed clean K/V, replicated: each rank appends every commit.

`CascadeRank` is the executor's placement on one rank (engine/runtime/placement.py): the loop,
the views and the context modes are the engine's; this file supplies only the exchanges.
* joint context: at every layer the in-flight blocks' K/V are all-gathered in the cascade group
  into the same scratch layout one device uses, so each tick equals one forward over all its
  blocks, queries split by rank. Ranks without a block this tick still take part in the gathers.
* lagged context: each rank sends its blocks' K/V once per tick, asynchronously, and waits for
  them only before the next tick's forwards.
Finished blocks travel to the sink rank (the decode rank, or rank 0), which yields them in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from engine.config import Preset
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import Tick, blocks_per_tick, pyramid
from engine.runtime.kv import KVCache
from engine.runtime.outputs import Block, BlockKV
from engine.runtime.placement import Local
from parallel.topology import Topology


class _Layout:
    """Where each block of a tick lives: its owner rank and its slot in that rank's share."""

    def __init__(self, blocks: list[int], topology: Topology):
        self.blocks = blocks
        self.owner = {b: topology.owner(b) for b in blocks}
        shares: dict[int, list[int]] = {}
        for b in blocks:
            shares.setdefault(self.owner[b], []).append(b)
        self.slot = {b: shares[self.owner[b]].index(b) for b in blocks}
        self.mine = shares.get(topology.cascade_rank, [])
        self.widest = max(len(s) for s in shares.values())

    def gather(self, mine: torch.Tensor, group, ranks: int, tokens: int) -> dict[int, torch.Tensor]:
        """All ranks' blocks of a token-major tensor `[B, n*tokens, ...]` -> {block: `[B, tokens, ...]`}."""
        shape = (mine.shape[0], self.widest * tokens, *mine.shape[2:])
        padded = mine.new_zeros(shape)
        padded[:, : mine.shape[1]] = mine
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=group)
        return {b: parts[self.owner[b]][:, self.slot[b] * tokens : (self.slot[b] + 1) * tokens] for b in self.blocks}


class CascadeRank:
    """The placement of one cascade rank: owns blocks b with b mod C = its cascade rank."""

    exchanges_every_layer = True

    def __init__(self, topology: Topology, cache: KVCache, block_frames: int):
        self.topology, self.group = topology, topology.cascade_group()
        self.layers, self.batch, _, self.heads, self.head_dim = cache.k.shape
        self.empty = cache.k.new_zeros(self.batch, 0, self.heads, self.head_dim)
        self.tokens = block_frames * cache.T  # per block
        self._tick: Tick | None = None
        self._layout: _Layout | None = None

    def owns(self, block: int) -> bool:
        return self.topology.owner(block) == self.topology.cascade_rank

    def on_tick(self, tick: Tick) -> None:
        self.topology.faults.heartbeat(tick.index)
        self._tick, self._layout = tick, _Layout(tick.blocks, self.topology)

    def _waiting(self) -> None:
        """About to depend on every peer: say so, in case one of them hangs."""
        self.topology.faults.heartbeat(self._tick.index, "waiting")

    def gather_layer(self, layer: int, blocks: list[int], mine: dict[int, tuple]) -> dict[int, tuple]:
        if layer == 0:
            self._waiting()
        layout, size = self._layout, self.topology.cascade_size
        keys = torch.cat([mine[b][0] for b in layout.mine], 1) if layout.mine else self.empty
        values = torch.cat([mine[b][1] for b in layout.mine], 1) if layout.mine else self.empty
        keys = layout.gather(keys, self.group, size, self.tokens)
        values = layout.gather(values, self.group, size, self.tokens)
        return {b: (keys[b], values[b]) for b in blocks}

    def exchange_tick(self, blocks: list[int], mine: dict[int, BlockKV]) -> Callable[[], dict[int, BlockKV]]:
        """All-gather every rank's blocks' K/V of this tick, asynchronously; the call waits."""
        layout, L = self._layout, self.layers
        width = 2 * L * self.tokens  # [B, 2 L tokens, H, Dh] per block: keys then values, layers along tokens
        flat = [torch.cat([mine[b].keys, mine[b].values]).permute(1, 0, 2, 3, 4).reshape(self.batch, width, self.heads,
                self.head_dim) for b in layout.mine]  # fmt: skip
        padded = self.empty.new_zeros(self.batch, layout.widest * width, self.heads, self.head_dim)
        if flat:
            padded[:, : len(flat) * width] = torch.cat(flat, 1)
        parts = [torch.empty_like(padded) for _ in range(self.topology.cascade_size)]
        work = dist.all_gather(parts, padded, group=self.group, async_op=True)
        tick = self._tick

        def wait() -> dict[int, BlockKV]:
            self.topology.faults.heartbeat(tick.index, "waiting")
            work.wait()
            received = {}
            for b in layout.blocks:
                part = parts[layout.owner[b]][:, layout.slot[b] * width : (layout.slot[b] + 1) * width]
                kv = part.reshape(self.batch, 2 * L, self.tokens, self.heads, self.head_dim).permute(1, 0, 2, 3, 4)
                received[b] = BlockKV(kv[:L], kv[L:])
            return received

        return wait

    def deliver(self, executor, tick: Tick, finished: list[Block]) -> Iterator[Block]:
        """The sink rank yields every finished block in order; owners send theirs to it."""
        return _move_finished(tick, {b.index: b for b in finished}, executor, self.topology)


class OneStage(Local):
    """A plan that is not a cascade (sequential, pyramid) on one sp group beside a decode rank:
    every block on this group, as on one process; the group's first rank sends each finished
    block to the decode rank."""

    def __init__(self, topology: Topology):
        self.topology = topology

    def deliver(self, executor, tick: Tick, finished: list[Block]) -> Iterator[Block]:
        return _move_finished(tick, {b.index: b for b in finished}, executor, self.topology)


def _move_finished(tick: Tick, produced: dict[int, Block], executor, topology: Topology):
    last = executor.schedule.steps - 1
    for work in tick.work:
        if work.commit or work.step != last:
            continue
        sender = topology.stage_leader(topology.owner(work.block))  # its sp ranks all hold the block
        if sender == topology.rank and topology.is_decoder:
            yield produced[work.block]
        elif sender == topology.rank:
            dist.send(produced[work.block].latents.contiguous(), dst=topology.sink)
        elif topology.is_decoder:
            yield receive_block(work.block, executor.block_shape, executor.frames_per_block, sender, executor.device)


def receive_block(block: int, shape, frames_per_block: int, sender: int, device) -> Block:
    latents = torch.empty(shape, dtype=torch.float32, device=device)
    dist.recv(latents, src=sender)
    return Block(block, block * frames_per_block, latents)


def decode_rank_plan(
    preset: Preset, topology: Topology, num_blocks: int | None, on_tick: Callable[[Tick], object] = lambda tick: None
) -> Iterator[Block]:
    """A dedicated decode rank's share of a cascade of `preset` (or of its sequential or pyramid
    plan on one stage): no model, only the plan, to know which finished block arrives from which
    rank at which tick."""
    schedule = build_schedule(preset.sampling)
    offset = schedule.steps + 1 if preset.plan.schedule == "sequential" else preset.plan.offset  # the same ticks
    topology.check_plan(blocks_per_tick(schedule, offset, num_blocks), schedule.steps, offset)
    ticks = pyramid(schedule, offset=offset, num_blocks=num_blocks)
    frames = preset.stream.frames_per_block
    return decode_rank_blocks(ticks, schedule.steps, preset.latent_shape(frames), frames, topology, on_tick)


def decode_rank_blocks(
    ticks: Iterable[Tick],
    steps: int,
    shape,
    frames_per_block: int,
    topology: Topology,
    on_tick: Callable[[Tick], object] = lambda tick: None,
):
    """On a dedicated decode rank: receive every finished block, in order, as the plan says.
    `on_tick` runs once per tick, where the compute ranks ask for the tick's prompt."""
    for tick in ticks:
        on_tick(tick)
        topology.faults.heartbeat(tick.index, "waiting")
        for work in tick.work:
            if not work.commit and work.step == steps - 1:
                leader = topology.stage_leader(topology.owner(work.block))
                yield receive_block(work.block, shape, frames_per_block, leader, "cpu")
