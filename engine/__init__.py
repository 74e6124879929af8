"""arcade's engine: block-causal video diffusion streamed block by block, with no parallelism or
caching of its own (parallel/ and cache/ wrap it from outside; launch/ assembles it).

May import: torch and the libraries a part loads; never cache/, parallel/ or launch/ (the `-m`
shims hand over to launch/ under `__main__` only). Layers, bottom to top (tests/project/test_layering.py):
config, argparsing, devices, footprint, weight_paths -> models -> plan -> sampling -> runtime ->
serving -> demo -> eval -> families, loading -> the entry points.

Entry points: `python -m engine.generate` (a video to MP4), `python -m engine.stream` (a live
stream or sessions server), `python -m engine.client` (watch one); in Python, `engine.loading`'s
builders and `engine.runtime.session.Session`.
"""
