"""The throughput model of cascade x sp splits, and the split chooser (pure arithmetic, no GPU).

pytest tests/launch/test_cascade_model.py
"""

import argparse
import math

import pytest

from launch.benchmarks import cascade_model, split_table
from launch.presets import get_preset
from launch.split import choose_split, rank_splits
from launch.throughput import (
    LINKS,
    NVLINK,
    Link,
    Split,
    a2a_bytes_per_layer,
    activation_bytes_per_layer,
    block_forward_s,
    kv_bytes_per_layer,
    latent_bytes,
    shard_factor,
    sp_comm_s,
    sp_refusal,
    split_time,
)

SMALL, BIG = "self-forcing-1.3b", "wan-14b-causal"
FREE = Link("free", 1e9, 0.0, 1.0)  # a link that costs nothing
FAR = Link("far", 50.0, 5000.0, 0.8)  # plenty of bandwidth, 5 ms per collective step


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cascade_model.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bytes_per_layer_by_hand():
    preset = get_preset(SMALL)  # 1536 wide, 12 heads of 128, 30 layers
    tokens = 3 * (480 // 8 // 2) * (832 // 8 // 2)  # 3 latent frames of 30 x 52 patches
    assert tokens == 4680
    payload = tokens * 4 * 1536 * 2  # q, k, v, out; bf16
    assert activation_bytes_per_layer(preset) == payload == 57_507_840
    assert a2a_bytes_per_layer(preset, 4) == pytest.approx(3 / 4 * payload / 4) == 10_782_720
    assert kv_bytes_per_layer(preset) == tokens * 2 * 1536 * 2
    assert latent_bytes(preset) == 16 * 3 * 60 * 104 * 4  # float32 flow, 16 channels
    # sp 2 on NVLink: per layer 3 all-to-alls' latency + half of a 1/2 shard at 0.7 x 450 GB/s,
    # then a ring all-gather of the output over 1 step.
    per_layer = 3 * 10e-6 + 0.5 * (payload / 2) / (450e9 * 0.7)
    gather = 1 * ((16 * 3 * 60 * 104 * 4) / 2 / 450e9 + 10e-6)
    assert sp_comm_s(preset, 2, 1, NVLINK) == pytest.approx(30 * per_layer + gather, rel=1e-12)
    big = get_preset(BIG)
    assert a2a_bytes_per_layer(big, 8) == pytest.approx(7 / 8 * tokens * 4 * 5120 * 2 / 8)


def test_sp1_reproduces_the_cascade_rows():
    args = _args()
    rows = [row for row in cascade_model.model_rows(args) if row["offset"] != "sequential"]
    assert len(rows) == 48
    links = {link.name: link for link in cascade_model.CASCADE_LINKS}
    for row in rows:
        preset = get_preset(row["preset"])
        split = Split(row["ranks"], 1)
        forward_s = block_forward_s(row["preset"], {})
        t = split_time(preset, forward_s, split, row["offset"], row["context"], links[row["link"]], decode_s=0.0)
        assert t.denoise_fps == row["fps"] and 1000 * t.tick_s == row["tick_ms"], row
        assert t.sp_comm_s == 0.0 and 1000 * t.cascade_comm_s == row["comm_ms"]
    # pinned before the model gained sp: 5 ranks, offset 1, joint, on NVLink
    pinned = {(r["preset"], r["link"][:6], r["context"]): r for r in rows if r["ranks"] == 5 and r["offset"] == 1}
    assert pinned[(SMALL, "NVLink", "joint")]["tick_ms"] == pytest.approx(212.45174253868103, rel=1e-12)
    assert pinned[(SMALL, "NVLink", "joint")]["fps"] == pytest.approx(56.48341527636641, rel=1e-12)
    assert pinned[(BIG, "PCIe 5", "joint")]["comm_ms"] == pytest.approx(310.70848, rel=1e-12)
    assert pinned[(BIG, "PCIe 5", "lagged")]["fps"] == pytest.approx(17.311376537369917, rel=1e-12)


def test_shard_efficiency():
    small, big = get_preset(SMALL), get_preset(BIG)
    tokens, keys = 4680, 21 * 1560
    assert shard_factor(small, 1, tokens, keys) == 1.0
    assert shard_factor(big, 2, tokens, keys) == pytest.approx(0.5, rel=0.03)
    # 12 heads over 3 ranks: 37 query tiles x 4 heads = 148 attention CTAs, two waves on 132 SMs
    assert shard_factor(small, 3, tokens, keys) > 1.3 / 3
    assert shard_factor(small, 3, tokens, keys, waves=False) == pytest.approx(1 / 3)


def test_a_free_link_favours_sp():
    for objective in ("fps", "latency"):
        choice = choose_split(BIG, 5, FREE, decode_s=0.0, waves=False, objective=objective)
        assert choice.split == Split(1, 5), choice.reason
    assert choose_split(SMALL, 4, FREE, decode_s=0.0, waves=False).split.sp > 1


def test_a_slow_link_favours_the_cascade():
    for context in ("joint", "lagged"):
        choice = choose_split(BIG, 5, FAR, context=context)
        assert choice.split.sp == 1 and choice.split.cascade == 5, choice.reason
        assert choice.runner_up is not None and choice.runner_up.sp > 1  # the reason compares with sp


def test_a_decode_rank_pays_only_when_decoding_costs():
    assert choose_split(BIG, 5, "nvlink", decode_s=0.0).split == Split(1, 5)
    assert choose_split(BIG, 5, "nvlink", decode_s=0.3).split.decode_rank


def test_the_chooser_offers_only_runnable_splits_and_says_why():
    # the 1.3B has 12 heads: sp 2, 3, 4 or 6 (any token count), and at most 5 stages
    assert sp_refusal(get_preset(SMALL), 4) is None and sp_refusal(get_preset(BIG), 8) is None
    assert sp_refusal(get_preset(SMALL), 5) == "sp 5 does not divide 12 heads"
    assert sp_refusal(get_preset("magi-1-4.5b"), 3) == "sp 3 does not divide 24 heads (8 key/value)"
    for gpus in (4, 5, 7, 8):
        ranked = rank_splits(SMALL, gpus, "nvlink")
        assert ranked and all(split.sp in (1, 2, 3, 4, 6) and split.cascade <= 5 for split, _ in ranked)
    choice = choose_split(SMALL, 5, "nvlink")
    assert choice.split == rank_splits(SMALL, 5, "nvlink")[0][0]
    assert choice.reason.startswith(f"5 GPUs on NVLink: cascade {choice.split.cascade} x sp {choice.split.sp}")
    assert f"{choice.time.fps:.1f} FPS modelled vs" in choice.reason and "\n" not in choice.reason
    only = choose_split(BIG, 7, "nvlink")  # 40 heads: 3 x 2 + decode rank is the one split of 7 that runs
    assert only.split == Split(3, 2, decode_rank=True) and "the only split that runs" in only.reason
    assert "6 of the GPUs would do better: 1 x 5 + decode rank" in only.reason
    with pytest.raises(ValueError, match="unknown link"):
        choose_split(SMALL, 4, "ethernet")
    # a plan that is not a cascade runs on one sp group (+ decode rank): 8 GPUs cannot split 12 heads
    assert {split.cascade for split, _ in rank_splits(SMALL, 5, "nvlink", one_stage=True)} == {1}
    with pytest.raises(ValueError, match="one stage: sp must divide the heads"):
        choose_split(SMALL, 8, "nvlink", one_stage=True)


def test_two_machine_placements():
    found = {(f"{s.cascade}x{s.sp}", crossing) for s, crossing in split_table.placements(4)}
    assert found == {("8x1", "cascade"), ("4x2", "cascade"), ("4x2", "sp"), ("2x4", "cascade"), ("2x4", "sp"),
                     ("1x8", "sp")}  # fmt: skip


def test_every_table_row_is_finite(capsys):
    tables = cascade_model.split_tables(_args())
    out = capsys.readouterr().out
    assert "Splits of 4, 5, 8 GPUs" in out and "wan-14b-causal: 5 GPUs on NVLink" in out
    assert len(tables["splits"]) == 2 * len(LINKS) * (5 + 5 + 6)  # factorisations of 4, 5, 8 (+ decode rank)
    assert len(tables["choices"]) == 2 * len(LINKS) * 3
    for name, rows in tables.items():
        assert rows, name
        for row in rows:
            numbers = [v for v in row.values() if isinstance(v, (int, float))]
            assert numbers and all(math.isfinite(v) for v in numbers), (name, row)
    for row in tables["splits"]:
        # waves can beat 1/N by a little (14B at sp 2), never by much
        assert 0 < row["fps"] <= row["ideal_fps"] * 1.02 and row["fps"] <= row["denoise_fps"] * (1 + 1e-9), row
