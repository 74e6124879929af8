"""The KV cache: cached streaming equals the block-causal model; eviction, sink and long streams.

pytest tests/runtime/test_kv.py
"""

import pytest
import torch

from engine.models.attention import LocalView
from engine.models.rope import Rope, apply_rope
from engine.models.wan import WanModel
from helpers import TINY, assert_close, tiny_cache, tiny_model

BLOCK = 3


def _latents(frames: int, grid=(2, 2), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, TINY.in_channels, frames, 2 * grid[0], 2 * grid[1], generator=generator)


def _text(model: WanModel, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return model.embed_text(torch.randn(1, 8, TINY.text_dim, generator=generator))


@torch.no_grad()
def test_cached_blocks_equal_one_block_causal_forward():
    """Block by block through the cache == one uncached forward over all blocks with a block-causal mask."""
    model, blocks, grid = tiny_model(), 4, (3, 4)
    latents = _latents(blocks * BLOCK, grid)
    sigma = torch.rand(1, blocks * BLOCK, generator=torch.Generator().manual_seed(2))
    text = _text(model)
    full_view = LocalView(Rope(TINY, grid), 0, blocks * BLOCK, BLOCK, "causal")
    expected = model(latents, sigma, text, full_view)

    cache = tiny_cache(TINY, grid, sink=0, ring=blocks * BLOCK, scratch=BLOCK)
    for b in range(blocks):
        frames = slice(b * BLOCK, (b + 1) * BLOCK)
        x, s = latents[:, :, frames], sigma[:, frames]
        view = cache.view(first_frame=b * BLOCK, frames=BLOCK, block_frames=BLOCK, mode="causal")
        actual = model(x, s, text, view)
        assert_close(actual, expected[:, :, frames], 1e-5, f"block {b}")
        commit = cache.view(first_frame=b * BLOCK, frames=BLOCK, block_frames=BLOCK, mode="causal", commit_frames=BLOCK)
        model(x, s, text, commit)
        commit.commit()


@torch.no_grad()
def test_causal_mask_hides_later_blocks():
    """In one causal call, changing block 1 leaves block 0's output unchanged; bidirectional does not."""
    model, grid = tiny_model(), (2, 2)
    latents = _latents(2 * BLOCK, grid)
    changed = latents.clone()
    changed[:, :, BLOCK:] += 1.0
    sigma, text = torch.full((1, 2 * BLOCK), 0.5), _text(model)
    for mode, same in (("causal", True), ("bidirectional", False)):
        a = model(latents, sigma, text, LocalView(Rope(TINY, grid), 0, 2 * BLOCK, BLOCK, mode))[:, :, :BLOCK]
        b = model(changed, sigma, text, LocalView(Rope(TINY, grid), 0, 2 * BLOCK, BLOCK, mode))[:, :, :BLOCK]
        assert torch.equal(a, b) is same, f"{mode}: block 0 {'changed' if same else 'did not change'}"


class NaiveWindowView:
    """Reference semantics, written plainly: un-rotated K/V per frame in lists, the visible set is
    the sink plus the last `ring` frames, and every call rotates all keys afresh:
    * rebased: at small positions with the sink right before the window: [sink 0..S-1, recent S..,
      in-flight ...] (Rolling Forcing / LongLive's infinite variant);
    * fixed: every frame at its true position, the sink at 0..S-1 forever (Self-Forcing, LongLive
      v1's released inference)."""

    def __init__(self, store, rope: Rope, sink: int, ring: int, first_frame: int, frames: int, commit: bool, mode):
        self.store, self.sink, self.ring, self.commit_frame = store, sink, ring, first_frame if commit else None
        committed = len(store["k"][0])
        self.visible = list(range(min(committed, sink))) + list(range(max(sink, committed - ring), committed))
        self.rope, self.frames = rope, frames
        if mode == "rebased":
            self.rotation = rope.tables(len(self.visible), frames)
            self.context_rotation = rope.tables(0, len(self.visible))
        else:
            self.rotation = rope.tables(first_frame, frames)
            self.context_rotation = torch.cat([rope.tables(f, 1) for f in self.visible] or [rope.tables(0, 1)[:0]])
        self.pending = {}

    def context(self, layer, q, k, v):
        T = self.rope.tokens_per_frame
        self.pending[layer] = (k, v)
        keys = [self.store["k"][layer][f] for f in self.visible]
        values = [self.store["v"][layer][f] for f in self.visible]
        rotated = apply_rope(torch.cat(keys, 1), self.context_rotation) if keys else k[:, :0]
        keys = torch.cat([rotated, apply_rope(k, self.rotation)], 1)
        values = torch.cat(values + [v], 1)
        assert keys.shape[1] == (len(self.visible) + self.frames) * T
        return apply_rope(q, self.rotation), keys, values, None

    def output(self, layer, out):
        return out

    def commit(self):
        if self.commit_frame is None:
            return
        T = self.rope.tokens_per_frame
        for layer, (k, v) in self.pending.items():
            for j in range(self.frames):
                self.store["k"][layer].append(k[:, j * T : (j + 1) * T])
                self.store["v"][layer].append(v[:, j * T : (j + 1) * T])


@pytest.mark.parametrize("mode", ["rebased", "fixed"])
@pytest.mark.parametrize("sink,ring", [(3, 6), (2, 5), (0, 4)])
@torch.no_grad()
def test_long_stream_with_eviction_matches_reference(sink, ring, mode):
    """A stream far past 1024 frames (the reference RoPE table) equals the naive window of its sink mode.

    Our cache keeps keys rotated at absolute positions (> 1024 here) and, re-basing, moves the sink
    by one rotation; the rebased reference re-rotates everything at small re-based positions, the
    fixed one at true positions. RoPE depends only on distances, so each pair agrees to float
    rounding at every block. ring=5 wraps mid-block."""
    model, grid, blocks = tiny_model(), (2, 2), 350
    rope = Rope(TINY, grid)
    cache = tiny_cache(TINY, grid, sink=sink, ring=ring, scratch=BLOCK, rebase_sink=mode == "rebased")
    store = {"k": [[] for _ in range(TINY.num_layers)], "v": [[] for _ in range(TINY.num_layers)]}
    text, pointer = _text(model), cache.k.data_ptr()
    generator = torch.Generator().manual_seed(5)
    for b in range(blocks):
        x = torch.randn(1, TINY.in_channels, BLOCK, 4, 4, generator=generator)
        sigma = torch.full((1, BLOCK), 0.3)
        for commit in (False, True):
            ours = cache.view(
                first_frame=b * BLOCK, frames=BLOCK, block_frames=BLOCK, mode="causal", commit_frames=BLOCK * commit
            )
            naive = NaiveWindowView(store, rope, sink, ring, b * BLOCK, BLOCK, commit, mode)
            actual, expected = model(x, sigma, text, ours), model(x, sigma, text, naive)
            ours.commit(), naive.commit()
            if b % 25 == 0 or b == blocks - 1:
                assert_close(actual, expected, 2e-5, f"block {b} (frames {b * BLOCK}..), commit={commit}")
    assert cache.committed == blocks * BLOCK > 1024
    assert cache.visible_frames == sink + ring
    assert cache.k.data_ptr() == pointer, "the cache must not reallocate"


@torch.no_grad()
def test_the_two_sink_modes_part_once_the_window_slides():
    """Fixed and re-based sinks are the same model until the ring wraps, and differ after."""
    model, grid = tiny_model(), (2, 2)
    caches = {mode: tiny_cache(TINY, grid, sink=3, ring=6, scratch=BLOCK, rebase_sink=mode) for mode in (False, True)}
    text, generator = _text(model), torch.Generator().manual_seed(1)
    for b in range(6):
        x, sigma = torch.randn(1, TINY.in_channels, BLOCK, 4, 4, generator=generator), torch.full((1, BLOCK), 0.3)
        out = {}
        for rebase, cache in caches.items():
            view = cache.view(first_frame=b * BLOCK, frames=BLOCK, block_frames=BLOCK, mode="causal",
                              commit_frames=BLOCK)  # fmt: skip
            out[rebase] = model(x, sigma, text, view)
            view.commit()
        if b * BLOCK <= 3 + 6:  # nothing evicted yet: the sink and the recent frames still touch
            assert torch.equal(out[False], out[True]), f"block {b}: the sink modes must agree before eviction"
        else:
            assert (out[False] - out[True]).abs().max() > 1e-4, f"block {b}: the sink modes should differ"


def test_view_rejects_gaps_and_oversized_calls():
    cache = tiny_cache(TINY, (2, 2), sink=0, ring=6, scratch=BLOCK)
    with pytest.raises(ValueError, match="committed"):
        cache.view(first_frame=3, frames=BLOCK, block_frames=BLOCK, mode="causal")
    with pytest.raises(ValueError, match="scratch"):
        cache.view(first_frame=0, frames=2 * BLOCK, block_frames=BLOCK, mode="causal")
    with pytest.raises(ValueError, match="attention mode"):
        cache.view(first_frame=0, frames=BLOCK, block_frames=BLOCK, mode="sideways")


def test_slots_and_visible_frames_bookkeeping():
    cache = tiny_cache(TINY, (2, 2), sink=2, ring=4, scratch=BLOCK)
    cache.committed = 11
    assert cache.visible_frame_ids() == [0, 1, 7, 8, 9, 10]
    assert [cache.slot_of(f) for f in (0, 1, 2, 5, 6, 7, 10)] == [0, 1, 2, 5, 2, 3, 2]
    cache.reset()
    assert cache.visible_frames == 0 and cache.visible_frame_ids() == []
