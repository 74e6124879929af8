"""The loop: one executor per stream, composed from parts, over a preallocated KV cache.

May import: engine.config, models, plan and sampling (never serving/ or above). Main entry
points: `executor.Executor(plan, model, kv, Parts(...))`, `kv.KVCache`, `views.InFlightView`,
`session.Session` (a loaded model that runs streams), `coalesce.step_together` (many streams'
shared forwards).
"""
