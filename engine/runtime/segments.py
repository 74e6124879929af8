"""SkyReels-V2's long videos on the runtime: each segment's matrix plan on its own executor."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from engine.plan.skyreels import Segment
from engine.plan.timeline import skyreels_matrix, skyreels_plan
from engine.runtime.executor import Executor
from engine.runtime.outputs import Block


def run_segments(
    segments: list[Segment],
    make_executor: Callable[[Segment], Executor],
    text,
    *,
    offset: int,
    block_frames: int,
    initial: Callable[[int], torch.Tensor] | None = None,
    history: dict[int, torch.Tensor] | None = None,
) -> Iterator[Block]:
    """Run each segment's matrix plan; yield new blocks with absolute indices, in order.
    `history`: clean latents of given first blocks (the first segment's prefix)."""
    history = dict(history or {})  # absolute block -> clean latents (only the overlap is kept)
    for segment in segments:
        executor = make_executor(segment)
        first_block = segment.first_frame // block_frames
        history = {b: v for b, v in history.items() if b >= first_block}  # the prefix is all that is read
        prefix = {b: history[first_block + b] for b in range(segment.prefix_frames // block_frames)}
        matrix = skyreels_matrix(
            segment.frames,
            [int(t) for t in executor.schedule.model_t],
            segment.frames,
            ar_step=offset,
            num_pre_ready=segment.prefix_frames,
            causal_block_size=block_frames,
        )
        ticks = skyreels_plan(executor.schedule, matrix, block_frames)
        start = (lambda b, s=first_block: initial(s + b)) if initial else None
        for block in executor.run(ticks, text, initial=start, prefix=prefix):
            absolute = first_block + block.index
            history[absolute] = block.latents
            if block.first_frame >= segment.new_from:
                yield Block(absolute, absolute * block_frames, block.latents)
