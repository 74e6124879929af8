"""Plans as data: which (block, step) pairs run at each tick, and the noise level of every step.

May import: engine.config only. Main entry points: `timeline` (`Tick`, `Work`, the sequential and
pyramid plans), `sigmas.build_schedule`, `skyreels` (SkyReels-V2's segment plans).
"""
