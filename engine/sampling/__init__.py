"""Turning a forward into new latents: seeded noise, per-block solvers, guidance.

May import: engine.config, engine.models, engine.plan. Main entry points: `noise.NoiseSource`,
`solvers.make_solver`, `guidance.ClassifierFree`, `magi_guidance.MagiGuidance`.
"""
