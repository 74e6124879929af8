"""The denoiser's forward as the runtime calls it: compiled whole-graph, under the chosen attention.

`FastForward(model, speed, attention)` stands where the model stands (same call, same attributes;
cf. `ShardedModel`). With `speed.compile` on, the model's forward is `torch.compile`d with
`fullgraph=True`: a graph break is an error, not a silent slowdown. The attention view the model
is handed (`LocalView`, `InFlightView`) is traced through; what it reads per tick is either a
tensor (rotations, the block mask, the KV buffers) or a host integer that only changes while the
window fills (the scratch's first slot, the number of in-flight blocks). Shapes are static
(`dynamic=False`): each distinct (committed frames, in-flight blocks) layout of a plan compiles
once, so a stream compiles a few graphs while its window fills and none once it slides. Blocks
the forward does not compute (lagged context, feature caching) have their K/V written into the
scratch before the compiled call (`InFlightView.fill_ahead`): the graph then sees scratch
offsets, not the absolute block numbers the fill would specialise it on.

Measured on a 2-core CPU (`python -m launch.bench compile`): about the same time per tick as
eager (the demo 1.1x, mid-wan 0.94-1.0x: one CPU thread's forward is its matmuls, which compiling
does not change; RoPE's complex multiply stays an inductor fallback). The point is the GPU,
where per-kernel launch overhead is what compiling and CUDA graphs remove.

`graphs` (mode="reduce-overhead") replays the steady-state forward as a CUDA graph. For that the
KV buffers a forward writes are marked static (`prepare_cache`): cudagraph trees then write them in
place instead of refusing to capture a forward that mutates its inputs.
"""

from __future__ import annotations

import torch

from engine.config import SpeedConfig
from engine.runtime.backends import AttentionChoice

MODES = {"default": "default", "graphs": "reduce-overhead"}
LAYOUTS = 64
"""Graphs one compiled forward may hold: a pyramid's window fills through up to (window blocks x
blocks in flight x mask or none) layouts before it slides (torch's default stops at 8)."""


class FastForward:
    """`model(latents, sigma, text, view, fps=...)`, compiled or eager, inside `attention.context()`."""

    def __init__(self, model, speed: SpeedConfig, attention: AttentionChoice, backend: str = "inductor"):
        self.model, self.speed, self.attention = model, speed, attention
        self.compiled = speed.compile != "off"
        if self.compiled:
            self._forward = torch.compile(model, fullgraph=True, dynamic=False, backend=backend,
                                          mode=MODES[speed.compile] if backend == "inductor" else None)  # fmt: skip

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text, view, **kwargs) -> torch.Tensor:
        if not self.compiled:
            with self.attention.context():
                return self.model(latents, sigma, text, view, **kwargs)
        if hasattr(view, "fill_ahead"):
            view.fill_ahead(self.model.cfg.num_layers)  # the traced forward then sees offsets, not blocks
        with self.attention.context(), torch._dynamo.config.patch(recompile_limit=LAYOUTS):
            return self._forward(latents, sigma, text, view, **kwargs)

    def prepare_cache(self, cache) -> None:
        """Mark a stream's KV buffers as fixed-address inputs (CUDA graphs write them in place)."""
        if self.speed.compile != "graphs" or cache is None:
            return
        for buffer in (cache.k, cache.v, cache.sink_k):
            torch._dynamo.mark_static_address(buffer)

    def line(self) -> str:
        """One line for start-up: how the forward runs."""
        forward = {"off": "eager", "default": "compiled (torch.compile, whole graph)",
                   "graphs": "compiled as CUDA graphs (reduce-overhead)"}[self.speed.compile]  # fmt: skip
        return f"forward: {forward}; {self.attention.line()}; KV cache: {self.speed.kv_cache}"
