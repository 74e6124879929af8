"""How to split G GPUs for a sessions server: K replicas, each a cascade x sp group (modelled).

    choice = choose_layout("wan-14b-causal", 5, "nvlink", cascade=True)
    choice.layout   # Layout(replicas=1, split=Split(cascade=5, sp=1))
    choice.reason   # "5 GPUs for sessions: 1 replica of cascade 5 x sp 1, ..."

A replica serves its own sessions (engine/serving/group.py). One session alone on a replica
streams at the replica's single-stream FPS (launch/throughput.py `split_time`) and shows its first
frame after one block's steps, commit and decode; a replica keeps floor(FPS / the stream's fps)
sessions at full frame rate (sessions on a group step one after another: coalescing, which helps
launch-bound small forwards, is not counted). The choice:

* if some layout keeps a session at full frame rate, the one that keeps the most sessions (ties:
  the faster session, then the sooner first frame): the GPUs serve as many viewers as they can;
* otherwise (no replica plays in real time, e.g. 14B on one GPU), the fastest session: a viewer
  is better served by one group streaming as fast as it can than by several that all stall.

Layouts without the cascade plan (`cascade=False`: the preset's own plan) use sp-only groups.
These are modelled numbers; nothing here ran on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import Preset
from launch.presets import get_preset
from launch.split import LABELS, refusal
from launch.throughput import LINKS, Split, preset_forward_s, split_time


@dataclass(frozen=True)
class Layout:
    replicas: int
    split: Split
    """Every replica's group."""

    def __str__(self) -> str:
        return f"{self.replicas} replica{'s' if self.replicas > 1 else ''} of {self.split}"


@dataclass(frozen=True)
class LayoutTime:
    session_fps: float
    """One session alone on its replica."""
    first_frame_s: float
    sessions: int
    """Sessions kept at the stream's frame rate, over every replica."""


@dataclass(frozen=True)
class LayoutChoice:
    layout: Layout
    time: LayoutTime
    reason: str


def layouts(gpus: int, cascade: bool) -> list[Layout]:
    """Every K x (cascade x sp) of `gpus` (sp-only groups without `cascade`); no decode ranks:
    a session's frames leave from its group's first rank."""
    found = []
    for replicas in range(1, gpus + 1):
        if gpus % replicas:
            continue
        group = gpus // replicas
        for sp in range(1, group + 1):
            if group % sp == 0 and (cascade or group == sp):
                found.append(Layout(replicas, Split(group // sp, sp)))
    return found


def layout_time(preset: Preset, layout: Layout, link, forward_s: float, offset: int = 1, context: str = "joint",
                decode_s: float | None = None) -> LayoutTime:  # fmt: skip
    one = split_time(preset, forward_s, layout.split, offset, context, link, decode_s=decode_s)
    held = math.floor(one.fps / preset.stream.fps + 1e-9)
    return LayoutTime(one.fps, one.latency_s, layout.replicas * held)


def rank_layouts(
    preset: Preset | str,
    gpus: int,
    link="nvlink",
    *,
    cascade: bool = True,
    offset: int = 1,
    context: str = "joint",
    forward_s: float | None = None,
) -> list[tuple[Layout, LayoutTime]]:
    """Layouts of `gpus` the launcher runs, best first (the order the module docstring gives)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    link = LINKS[link] if isinstance(link, str) else link
    forward_s = preset_forward_s(preset) if forward_s is None else forward_s
    timed = [
        (layout, layout_time(preset, layout, link, forward_s, offset, context))
        for layout in layouts(gpus, cascade)
        if refusal(preset, layout.split, offset) is None
    ]
    if any(t.sessions for _, t in timed):
        return sorted(timed, key=lambda item: (-item[1].sessions, -item[1].session_fps, item[1].first_frame_s))
    return sorted(timed, key=lambda item: (-item[1].session_fps, item[1].first_frame_s))


def choose_layout(preset: Preset | str, gpus: int, link: str = "nvlink", **settings) -> LayoutChoice:
    """The layout the model predicts best for a sessions server on `gpus` GPUs, with a one-line reason."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    ranked = rank_layouts(preset, gpus, link, **settings)
    if not ranked:
        raise ValueError(f"no layout of {gpus} GPUs runs {preset.name} (heads or blocks in flight do not fit)")
    (best, time), rest = ranked[0], ranked[1:]
    label = LABELS.get(link, str(link)) if isinstance(link, str) else link.name
    head = (f"{gpus} GPUs on {label} for sessions: {best}, {time.sessions} session(s) at {preset.stream.fps} fps, "
            f"each {time.session_fps:.1f} FPS alone, first frame {time.first_frame_s:.2f} s (modelled)")  # fmt: skip
    if not rest:
        return LayoutChoice(best, time, head)
    other, other_time = rest[0]
    rule = "keeps the most sessions at full frame rate" if time.sessions else "no layout plays in real time: fastest"
    reason = (f"{head}; {rule} (next: {other}, {other_time.sessions} session(s), "
              f"{other_time.session_fps:.1f} FPS)")  # fmt: skip
    return LayoutChoice(best, time, reason)
