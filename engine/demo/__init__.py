"""The shipped demo model: its synthetic scenes, word vocabulary, patch codec, and training.

May import: the engine layers below it, config to serving (never engine.eval or
engine.loading). Main entry points: `scenes` (prompts and their videos), `vocab.VocabEncoder`,
`pixels.PatchCodec`, `reading.read_frame`, `trainer` (used by `python -m launch.train_demo`).
"""
