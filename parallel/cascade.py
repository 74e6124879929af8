"""Block Cascading: the blocks of one stream denoise at once, each in-flight block on its own rank.

A pyramid plan keeps several blocks in flight; cascade rank r denoises blocks b with b mod C = r
(several per rank when more blocks are in flight than ranks). Every rank holds the model, and
the committed clean K/V, replicated: each rank appends every commit.

* `joint` context (CascadeJoint): at every layer the in-flight blocks' K/V are all-gathered in
  the cascade group into the same scratch layout the one-device executor uses, so each tick
  equals one forward over all its blocks, queries split by rank. Ranks without a block this tick
  still take part in the gathers.
* `lagged` context (CascadeLagged): a block attends to the other in-flight blocks' K/V from the
  previous tick (engine/lagged.py); each rank sends its blocks' K/V once per tick, asynchronously,
  and waits for them only before the next tick's forwards.

Finished blocks travel to the sink rank (the decode rank, or rank 0), which yields them in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from cache.executor import CachingExecutor
from engine.config import Preset
from engine.models.wan import TextKV
from engine.plan.sigmas import build_schedule
from engine.plan.timeline import Tick, blocks_per_tick, pyramid
from engine.runtime.executor import Block, Executor
from engine.runtime.kv import AttentionView, KVCache, block_mask
from engine.runtime.lagged import BlockKV, LaggedExecutor
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


class JointView(AttentionView):
    """This rank's blocks' queries against every in-flight block's current K/V (gathered per layer)."""

    def __init__(
        self,
        cache: KVCache,
        layout: _Layout,
        group,
        ranks: int,
        block_frames: int,
        mode: str,
        commits: int,
        on_wait: Callable[[], None] = lambda: None,
        computed: list[int] | None = None,
        stored: dict[int, BlockKV] | None = None,
        record: bool = False,
        reach: dict[int, int] | None = None,
    ):
        first = layout.blocks[0] * block_frames
        super().__init__(cache.rope, first, len(layout.blocks) * block_frames, block_frames, mode, reach)
        self.cache, self.layout, self.group, self.ranks, self.on_wait = cache, layout, group, ranks, on_wait
        # with feature caching, some of this rank's blocks are skipped: their last K/V stand in
        self.computed = layout.mine if computed is None else computed
        self.stored = stored or {}
        self.tokens = block_frames * cache.T
        self.commit_frames = commits * block_frames
        self.scratch_slot = cache.visible_frames
        self.end = (self.scratch_slot + self.frames) * cache.T
        self.own_rotation = torch.cat([cache.rope.tables(b * block_frames, block_frames) for b in self.computed] or [
            self.rotation[:0]])  # fmt: skip
        self.own_mask = None if mode == "bidirectional" or not self.computed else block_mask(
            cache.visible_frame_ids(), layout.blocks, block_frames, cache.T, self.rotation.device, reach, self.computed
        )  # fmt: skip
        # every layer's K/V of the computed blocks, kept only for feature caching (`recorded()`)
        self.record = record
        self.recorded_k: list[torch.Tensor] = []
        self.recorded_v: list[torch.Tensor] = []

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k = self.rope.apply(k, self.own_rotation)
        if self.record:
            self.recorded_k.append(k)
            self.recorded_v.append(v)
        self._exchange(layer, k, v)
        keys, values = self.cache.k[layer, :, : self.end], self.cache.v[layer, :, : self.end]
        return self.rope.apply(q, self.own_rotation), keys, values, self.own_mask

    def _mine(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contribution in slot order: fresh K/V of computed blocks, stored of skipped."""
        if self.computed == self.layout.mine:
            return k, v
        keys, values, i = [], [], 0
        for b in self.layout.mine:
            if b in self.computed:
                keys.append(k[:, i * self.tokens : (i + 1) * self.tokens])
                values.append(v[:, i * self.tokens : (i + 1) * self.tokens])
                i += 1
            else:
                keys.append(self.stored[b].keys[layer])
                values.append(self.stored[b].values[layer])
        return torch.cat(keys, 1), torch.cat(values, 1)

    def recorded(self) -> dict[int, BlockKV]:
        """Each computed block's K/V of this forward, every layer: `[L, B, tokens, H, Dh]`."""
        keys, values = torch.stack(self.recorded_k), torch.stack(self.recorded_v)
        spans = [slice(i * self.tokens, (i + 1) * self.tokens) for i in range(len(self.computed))]
        return {b: BlockKV(keys[:, :, span], values[:, :, span]) for b, span in zip(self.computed, spans)}

    def _exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Gather every block's K/V of this layer into the scratch, in block order (same on all ranks)."""
        if layer == 0:
            self.on_wait()  # about to depend on every peer: say so, in case one of them hangs
        k, v = self._mine(layer, k, v)
        keys = self.layout.gather(k, self.group, self.ranks, self.tokens)
        values = self.layout.gather(v, self.group, self.ranks, self.tokens)
        start = self.scratch_slot * self.cache.T
        for i, block in enumerate(self.layout.blocks):
            span = slice(start + i * self.tokens, start + (i + 1) * self.tokens)
            self.cache.k[layer, :, span], self.cache.v[layer, :, span] = keys[block], values[block]

    def idle(self, layers: int, batch: int, heads: int, head_dim: int) -> None:
        """A rank with no block this tick still takes part in every layer's gathers."""
        empty = torch.zeros(batch, 0, heads, head_dim, dtype=self.cache.k.dtype, device=self.cache.k.device)
        for layer in range(layers):
            self._exchange(layer, empty, empty)

    def finish(self) -> None:
        if self.commit_frames:
            self.cache._commit(self.scratch_slot, self.first_frame, self.commit_frames)


class CascadeRank:
    """What every cascade executor adds on its rank: the cascade group, the blocks it owns, and
    taking part in a tick's gathers without a forward of its own."""

    def __init__(self, *args, topology: Topology, **kwargs):
        super().__init__(*args, **kwargs)
        self.topology, self.group = topology, topology.cascade_group()

    def owns(self, block: int) -> bool:
        return self.topology.owner(block) == self.topology.cascade_rank

    def _idle(self, view: JointView) -> None:
        cfg = self.model.cfg
        view.idle(cfg.num_layers, self.cache.k.shape[1], cfg.kv_heads, cfg.head_dim)
        view.finish()


class CascadeJoint(CascadeRank, Executor):
    """The executor on one rank of a cascade with joint context."""

    def _compute(self, tick: Tick, text: TextKV) -> dict[int, torch.Tensor]:
        view = joint_view(self, tick)
        mine = self._selective_members(tick)
        if not mine:
            self._idle(view)
            return {}
        self._count(len(mine), view.scratch_slot + (len(view.layout.blocks) - len(mine)) * self.frames_per_block)
        return self._forward(mine, text, view)


def joint_view(executor: CascadeRank, tick: Tick, computed: list[int] | None = None, stored=None) -> JointView:
    """A cascade rank's view of `tick` with joint context. With feature caching, `computed` are
    its blocks that run (their K/V are recorded) and `stored` stands in for the skipped ones."""
    topology = executor.topology
    commits = sum(1 for w in tick.work if w.commit)
    waiting = lambda: topology.faults.heartbeat(tick.index, "waiting")  # noqa: E731
    return JointView(
        executor.cache, _Layout(tick.blocks, topology), executor.group, topology.cascade_size,
        executor.frames_per_block, executor.attention, commits, waiting, computed, stored, computed is not None,
        executor.reach(tick, tick.blocks),
    )  # fmt: skip


class CachingCascadeJoint(CascadeRank, CachingExecutor):
    """A cascade rank with joint context and feature caching: its skipped blocks send their last
    K/V into the per-layer gathers; the policy sees only this rank's blocks (no extra traffic)."""

    def _run(self, tick: Tick, members, run, text: TextKV) -> tuple[dict[int, torch.Tensor], dict]:
        view = joint_view(self, tick, [b for b, _, _ in run], self.stored)
        if not run:
            self._idle(view)
            return {}, {}
        return self._forward_recorded(view, run, text, len(view.layout.blocks))


class CascadeLagged(CascadeRank, LaggedExecutor):
    """The executor on one rank of a cascade with lagged context: K/V travel once per tick."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: tuple | None = None

    def _compute(self, tick: Tick, text: TextKV) -> dict[int, torch.Tensor]:
        self.complete()  # last tick's K/V must be in before this tick's forwards
        return super()._compute(tick, text)

    def _after_forwards(self, tick: Tick, fresh: dict[int, BlockKV]) -> None:
        """Send this rank's blocks' K/V to every rank; finish when the next tick needs them."""
        layout = _Layout(tick.blocks, self.topology)
        cfg, batch = self.model.cfg, self.cache.k.shape[1]
        tokens = self.frames_per_block * self.cache.T
        # [B, n * L * tokens, H, Dh]: layers laid out along the token axis of each block
        per_block = [torch.cat([fresh[b].keys, fresh[b].values]).permute(1, 0, 2, 3, 4) for b in layout.mine]
        mine = torch.cat([kv.reshape(batch, -1, cfg.num_heads, cfg.head_dim) for kv in per_block], dim=1) if per_block \
            else self.cache.k.new_zeros(batch, 0, cfg.num_heads, cfg.head_dim)  # fmt: skip
        width = 2 * cfg.num_layers * tokens
        padded = mine.new_zeros(batch, layout.widest * width, cfg.num_heads, cfg.head_dim)
        padded[:, : mine.shape[1]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.topology.cascade_size)]
        work = dist.all_gather(parts, padded, group=self.group, async_op=True)
        self._pending = (work, parts, layout, tick, width)

    def complete(self) -> None:
        """Wait for the last tick's K/V, then make them the context and commit finished blocks."""
        if self._pending is None:
            return
        work, parts, layout, tick, width = self._pending
        self._pending = None
        self.topology.faults.heartbeat(tick.index, "waiting")
        work.wait()
        cfg, tokens = self.model.cfg, self.frames_per_block * self.cache.T
        fresh = {}
        for b in layout.blocks:
            flat = parts[layout.owner[b]][:, layout.slot[b] * width : (layout.slot[b] + 1) * width]
            kv = flat.reshape(flat.shape[0], 2 * cfg.num_layers, tokens, *flat.shape[2:]).permute(1, 0, 2, 3, 4)
            fresh[b] = BlockKV(kv[: cfg.num_layers], kv[cfg.num_layers :])
        super()._after_forwards(tick, fresh)


def deliver(
    executor: Executor, ticks: Iterable[Tick], text: TextKV | Callable[[Tick], TextKV], topology: Topology
) -> Iterator[Block]:
    """Run a cascade rank's ticks; the sink rank yields every finished block in order."""
    for tick in ticks:
        topology.faults.heartbeat(tick.index)
        produced = {b.index: b for b in executor.step(tick, text(tick) if callable(text) else text)}
        yield from _move_finished(tick, produced, executor, topology)
    if isinstance(executor, CascadeLagged):
        executor.complete()


def _move_finished(tick: Tick, produced: dict[int, Block], executor: Executor, topology: Topology):
    last = executor.schedule.steps - 1
    for work in tick.work:
        if work.commit or work.step != last:
            continue
        owner = topology.owner(work.block)
        if owner == topology.rank and topology.is_decoder:
            yield produced[work.block]
        elif owner == topology.rank:
            dist.send(produced[work.block].latents.contiguous(), dst=topology.sink)
        elif topology.is_decoder:
            yield receive_block(work.block, executor.block_shape, executor.frames_per_block, owner, executor.device)


def receive_block(block: int, shape, frames_per_block: int, owner: int, device) -> Block:
    latents = torch.empty(shape, dtype=torch.float32, device=device)
    dist.recv(latents, src=owner)
    return Block(block, block * frames_per_block, latents)


def decode_rank_plan(
    preset: Preset, topology: Topology, num_blocks: int | None, on_tick: Callable[[Tick], object] = lambda tick: None
) -> Iterator[Block]:
    """A dedicated decode rank's share of a cascade of `preset`: no model, only the plan, to know
    which finished block arrives from which rank at which tick."""
    schedule, offset = build_schedule(preset.sampling), preset.plan.offset
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
                yield receive_block(work.block, shape, frames_per_block, topology.owner(work.block), "cpu")
