"""Which split of G GPUs the throughput model (launch/throughput.py) predicts best for one stream.

    choice = choose_split("wan-14b-causal", 5, "nvlink")
    choice.split   # Split(cascade=1, sp=4, decode_rank=True)
    choice.reason  # "5 GPUs on NVLink: cascade 1 x sp 4 + decode rank, 15.8 FPS modelled vs 14.2 for 5 x 1: ..."

Candidates are every cascade x sp factorisation of G, and of G - 1 plus a decode rank, that the
launcher accepts: sp divides the query and key/value heads (each rank takes a slice of the
tokens and a group of heads, engine/runtime/sharding.py), and the cascade has no more stages than
the plan keeps blocks in flight (parallel/topology.py refuses more). One stage runs the sequential
plan; the launcher offers a preset whose plan is not a cascade one stage only (`one_stage`).
They are ranked by modelled FPS (or latency), and the reason names the best candidate of the
other kind (cascade only vs with sp) for comparison. These are modelled numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Preset
from launch.presets import get_preset
from launch.throughput import (
    LINKS,
    Link,
    Split,
    SplitTime,
    blocks_in_flight,
    preset_forward_s,
    sp_refusal,
    split_time,
    splits,
)

LABELS = {"nvlink": "NVLink", "pcie": "PCIe", "ib": "InfiniBand"}
OBJECTIVES = ("fps", "latency")


@dataclass(frozen=True)
class Choice:
    split: Split
    time: SplitTime
    reason: str
    """One line: the choice, its modelled FPS, the best alternative and why."""
    runner_up: Split | None


def refusal(preset: Preset, split: Split, offset: int) -> str | None:
    """Why the launcher would refuse `split` (None when it runs)."""
    why = sp_refusal(preset, split.sp)
    if why:
        return why
    in_flight = blocks_in_flight(preset, offset)
    if split.cascade > 1 and split.cascade > in_flight:
        return f"{split.cascade} stages for {in_flight} blocks in flight"
    return None


def _resolve(preset: Preset | str, link: Link | str) -> tuple[Preset, Link, str]:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; choose from: {', '.join(LINKS)}")
        return preset, LINKS[link], LABELS[link]
    return preset, link, link.name


def rank_splits(preset: Preset | str, gpus: int, link: Link | str = "nvlink", *, offset: int = 1,
                context: str = "joint", forward_s: float | None = None, decode_s: float | None = None,
                objective: str = "fps", one_stage: bool = False,
                **options) -> list[tuple[Split, SplitTime]]:  # fmt: skip
    """Runnable splits of exactly `gpus` GPUs, best first. `one_stage`: only cascade 1 x sp (+ decode
    rank), what a plan other than a cascade runs on. `options` go to throughput.cascade_tick."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from: {', '.join(OBJECTIVES)}")
    preset, link, _ = _resolve(preset, link)
    forward_s = preset_forward_s(preset) if forward_s is None else forward_s
    timed = [
        (split, split_time(preset, forward_s, split, offset, context, link, decode_s=decode_s, **options))
        for split in splits(gpus)
        if refusal(preset, split, offset) is None and not (one_stage and split.cascade > 1)
    ]
    if objective == "fps":
        return sorted(timed, key=lambda item: (-item[1].fps, item[1].latency_s))
    return sorted(timed, key=lambda item: (item[1].latency_s, -item[1].fps))


def _short(split: Split) -> str:
    return f"{split.cascade} x {split.sp}" + (" + decode rank" if split.decode_rank else "")


def _why(best: SplitTime, other: SplitTime) -> str:
    """The terms that differ: compute and communication per tick, and ticks per block."""
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731
    comm = lambda t: t.sp_comm_s + t.cascade_comm_s  # noqa: E731
    return (
        f"a block every {ms(best.period_s)} (tick {ms(best.tick_s)}, {ms(comm(best))} of it communication) "
        f"vs every {ms(other.period_s)} (tick {ms(other.tick_s)}, {ms(comm(other))} communication)"
    )


def choose_split(preset: Preset | str, gpus: int, link: Link | str = "nvlink", **settings) -> Choice:
    """The split the model predicts best for `gpus` GPUs on `link` (a LINKS key or a Link), with a
    one-line reason. `settings` as rank_splits (offset, context, forward_s, decode_s, objective...)."""
    preset, link, label = _resolve(preset, link)
    ranked = rank_splits(preset, gpus, link, **settings)
    if not ranked:
        fix = "; one stage: sp must divide the heads (a cascade takes more stages)" if settings.get("one_stage") else ""
        raise ValueError(f"no split of {gpus} GPUs runs {preset.name} (heads or blocks in flight do not fit{fix})")
    (best, time), rest = ranked[0], ranked[1:]
    others = [item for item in rest if (item[0].sp > 1) != (best.sp > 1)] or rest
    head = f"{gpus} GPU{'s' if gpus > 1 else ''} on {label}: cascade {best.cascade} x sp {best.sp}"
    head += " + decode rank" if best.decode_rank else ""
    fewer = _fewer(preset, gpus, link, time.fps, settings)
    if not others:
        return Choice(best, time, f"{head}, {time.fps:.1f} FPS modelled (the only split that runs){fewer}", None)
    other, other_time = others[0]
    reason = (
        f"{head}, {time.fps:.1f} FPS modelled vs {other_time.fps:.1f} for {_short(other)}: {_why(time, other_time)}"
    )
    return Choice(best, time, reason + fewer, other)


def _fewer(preset: Preset, gpus: int, link: Link, fps: float, settings: dict) -> str:
    """A note when fewer of the GPUs would stream faster (heads or rows that sp cannot split, a
    cascade longer than the blocks in flight, or decoding without a rank of its own)."""
    best = []
    for count in range(1, gpus):
        ranked = rank_splits(preset, count, link, **settings)
        if ranked:
            best.append((ranked[0][1].fps, count, ranked[0][0]))
    if not best or max(best)[0] <= 1.05 * fps:
        return ""
    better, count, split = max(best)
    return f"; {count} of the GPUs would do better: {_short(split)}, {better:.1f} FPS"
