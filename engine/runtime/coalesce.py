"""Many streams' ticks with shared forwards: `step_together`.

`step_together([(executor, tick, text), ...])` gives what `[ex.step(tick, text) for ...]` gives
(each stream's finished blocks, in order), but the forwards of streams whose calls have the same
shape run as ONE model call. Each stream keeps everything of its own: KV cache, prompt, seed,
plan position, cache-policy state. Per tick:

1. every executor `prepare`s: settle, its prompt, its members, its skip decisions, its view;
2. the forwards are grouped by what one call needs to be common: the model, the query frames,
   the latent size, the text length, the fps. Plans need not match: every sample carries its own
   noise levels (sigma `[B, F]`), positions (its own view rotates its queries and keys) and mask,
   so a sequential stream's block and a pyramid stream's one-block tick share a call, and a
   stream that just joined (no committed frames) shares with one that has a full window. Queries
   are not padded: a tick of 3 blocks does not share with a tick of 1;
3. one model call per group through a `StackedView`: latents `[sum B_i, C, F, H, W]`, sigma
   `[sum B_i, F]`, prompts `[sum B_i, L, dim]` (B_i: 1, or 2 with classifier-free guidance).
   At each layer the view hands each stream's slice of q, k, v to that stream's own view (which
   rotates them at its positions, writes its own KV scratch, records what its cache policy
   keeps); attention then runs once over the streams' keys, padded to the longest with a
   per-sample mask `[B, 1, N, M]` where their lengths differ;
4. every executor `finish`es: commit, skipped blocks' flows, solver steps, bookkeeping.

A stream shares its forward only where its parts allow (`shareable`): selective computation,
joint context on one process, classifier-free guidance, a skip part that does not tap layer
features (bwcache does: it would see the whole batch), an unsharded model. The others run their
forwards alone in the same tick, with the same results: lagged context (a forward per block
against the previous tick's K/V), cascade ranks (their exchanges are per stream), Ulysses
(collectives per forward), whole-window computation, and MAGI-1, whose guidance runs passes of
its own over its own text type. Streams spread over ranks (cascade placement) run each tick
whole, one stream after another in item order, so that every rank of their group meets the
same collectives in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.models.wan import TextKV
from engine.plan.timeline import Tick
from engine.runtime.context import Joint
from engine.runtime.executor import Executor, Prepared
from engine.runtime.outputs import Block
from engine.runtime.placement import Local
from engine.runtime.sharding import ShardedModel
from engine.sampling.guidance import ClassifierFree


@dataclass
class SharedCalls:
    """What `step_together` did with the forwards it ran (prepare's own forwards not counted)."""

    calls: int = 0
    """Model calls made."""
    forwards: int = 0
    """Stream forwards those calls served (each stream's `stats.forwards` counts its own)."""
    widest: int = 0
    """Most streams in one call."""

    def add(self, streams: int) -> None:
        self.calls += 1
        self.forwards += streams
        self.widest = max(self.widest, streams)


def step_together(
    items: Sequence[tuple[Executor, Tick, object]], calls: SharedCalls | None = None
) -> list[list[Block]]:
    """One tick of each (executor, tick, text), forwards of the same shape in one model call: every
    executor's finished blocks, in item order (as `executor.step(tick, text)` returns them)."""
    executors = [executor for executor, _, _ in items]
    if len({id(executor) for executor in executors}) != len(executors):
        raise ValueError("an executor appears twice in one step_together: a stream runs one tick at a time")
    calls = calls if calls is not None else SharedCalls()
    finished: dict[int, list[Block]] = {}
    for i, (executor, tick, text) in enumerate(items):
        # A stream spread over ranks runs its whole tick before the next stream's: a rank with
        # nothing to compute joins a stream's exchanges in `prepare`, a rank with blocks in the
        # forward, so interleaving the phases of two such streams would cross their collectives.
        if not isinstance(executor.placement, Local):
            finished[i] = executor.step(tick, text)
    local = [i for i in range(len(items)) if i not in finished]
    prepared = {i: executors[i].prepare(items[i][1], items[i][2]) for i in local}
    for group in _groups([executors[i] for i in local], [prepared[i] for i in local]):
        _run(group, calls)
    finished.update({i: executors[i].finish(prepared[i]) for i in local})
    return [finished[i] for i in range(len(items))]


def shareable(executor: Executor) -> bool:
    """Whether this executor's parts let its forward be part of a call shared with other streams."""
    return (
        executor.setup.compute == "selective"
        and isinstance(executor.context, Joint)
        and isinstance(executor.placement, Local)
        and isinstance(executor.guidance, ClassifierFree)
        and getattr(executor.skip, "shares_forward", False)
        and not isinstance(executor.model, ShardedModel)
    )


def share_key(executor: Executor, prepared: Prepared) -> tuple | None:
    """What forwards sharing one call must have in common (None: this one runs alone)."""
    if not shareable(executor) or not isinstance(prepared.text, TextKV):
        return None
    latents = prepared.run[0][1]
    frames = sum(member[1].shape[2] for member in prepared.run)
    _, channels, _, height, width = latents.shape
    return id(executor.model), frames, channels, height, width, latents.dtype, prepared.text.tokens, executor.fps


def _groups(executors: list[Executor], prepared: list[Prepared]) -> list[list[tuple[Executor, Prepared]]]:
    """The forwards still to run, grouped by `share_key` (a forward that cannot share: alone)."""
    groups: dict[tuple, list[tuple[Executor, Prepared]]] = {}
    for executor, tick in zip(executors, prepared):
        if tick.view is None:  # its forwards ran in prepare (lagged context, whole window)
            continue
        key = share_key(executor, tick)
        groups.setdefault(("alone", id(executor)) if key is None else key, []).append((executor, tick))
    return list(groups.values())


def _run(group: list[tuple[Executor, Prepared]], calls: SharedCalls) -> None:
    calls.add(len(group))
    if len(group) == 1:
        executor, tick = group[0]
        tick.flows = executor.forward(tick.run, tick.text, tick.view)
        return
    shared_forward(group)


def shared_forward(group: list[tuple[Executor, Prepared]]) -> None:
    """One model call for every stream of `group`; each stream's flows land in its `Prepared`."""
    xs, sigmas, texts = [], [], []
    for executor, tick in group:
        x, sigma = executor.guidance.batched(executor.inputs(tick.run), executor.sigma(tick.run))
        xs.append(x)  # [B_i, C, F, H, W]
        sigmas.append(sigma)  # [B_i, F] float64
        texts.append(_per_sample(tick.text, x.shape[0]))
    batches = [x.shape[0] for x in xs]
    view = StackedView([tick.view for _, tick in group], batches)
    first = group[0][0]
    with torch.no_grad(), contextlib.ExitStack() as observing:
        for executor, tick in group:
            observing.enter_context(executor.skip.observe(executor, [b for b, _, _ in tick.run]))
        flow = first.model(torch.cat(xs), torch.cat(sigmas), TextKV.stack(*texts), view, fps=first.fps)
    for (executor, tick), part in zip(group, flow.split(batches)):
        tick.flows = executor.outputs(tick.run, executor.guidance.combine(part), tick.view)


def _per_sample(text: TextKV, batch: int) -> TextKV:
    """`text` with one prompt per sample: `[batch, L, H, Dh]` per layer (a single prompt repeated)."""
    if text.batch == batch:
        return text
    if text.batch != 1:
        raise ValueError(f"{text.batch} prompts for {batch} samples")
    return TextKV([k.expand(batch, -1, -1, -1) for k in text.keys], [v.expand(batch, -1, -1, -1) for v in text.values])


class StackedView:
    """Several streams' attention views as one, their samples stacked along the batch.

    `views[i]` serves samples `batches[i]` (in order). Each view sees only its own samples' q, k, v
    and answers with its own keys (its cache, its in-flight blocks): `[B_i, M_i, H, Dh]`. The keys
    are stacked, padded to the longest M; the mask `[B, 1, N, M]` keeps each sample to its own
    keys (and to its view's own mask). With equal key lengths and no masks: no mask at all.
    """

    def __init__(self, views: list, batches: list[int]):
        self.views, self.batches = views, batches
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def context(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q, k, v: [sum B_i, N, H, Dh], un-rotated
        per_stream = zip(q.split(self.batches), k.split(self.batches), v.split(self.batches))
        parts = [view.context(layer, *qkv) for view, qkv in zip(self.views, per_stream)]
        lengths = [keys.shape[1] for _, keys, _, _ in parts]
        longest = max(lengths)
        queries = torch.cat([rotated for rotated, _, _, _ in parts])
        keys = _padded([keys for _, keys, _, _ in parts], longest)
        values = _padded([values for _, _, values, _ in parts], longest)
        return queries, keys, values, self._mask([mask for _, _, _, mask in parts], q.shape[1], lengths, q.device)

    def output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([view.output(layer, part) for view, part in zip(self.views, out.split(self.batches))])

    def _mask(self, masks: list, queries: int, lengths: list[int], device: torch.device) -> torch.Tensor | None:
        """`[B, 1, N, M]` bool, built once per call (every layer of a forward has the same)."""
        longest = max(lengths)
        if all(mask is None for mask in masks) and min(lengths) == longest:
            return None
        key = (queries, *lengths, *map(id, masks))
        if key not in self._masks:
            full = torch.zeros(sum(self.batches), 1, queries, longest, dtype=torch.bool, device=device)
            row = 0
            for mask, batch, length in zip(masks, self.batches, lengths):
                full[row : row + batch, :, :, :length] = True if mask is None else mask
                row += batch
            self._masks[key] = full
        return self._masks[key]


def _padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """`[B_i, M_i, H, Dh]` tensors -> `[sum B_i, length, H, Dh]`, zeros past each M_i."""
    if all(t.shape[1] == length for t in tensors):
        return torch.cat(tensors)
    out = tensors[0].new_zeros(sum(t.shape[0] for t in tensors), length, *tensors[0].shape[2:])
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out
