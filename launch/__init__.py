"""Entry points, presets, the composition root and benchmarks.

May import: everything (the top layer). Main entry points: `generate` and `stream` (the commands
behind `python -m engine.generate` / `engine.stream`), `presets.get_preset`, `build.build_session`
(the composition root), `cli` (flags -> config), `pipeline.StreamingPipeline` (the Python API),
`bench` (`python -m launch.bench`), `train_demo`.

Importing this package sets OpenMP's wait policy to passive unless the user chose one: it must be
set before torch loads its OpenMP runtime, and every command (`python -m launch.*`, and the
`engine.generate` / `engine.stream` entry points that hand over here) imports this first.
launch/threads.py says why.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
