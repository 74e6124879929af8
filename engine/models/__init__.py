"""The networks and their files: pure math with no schedule, cache policy or parallelism.

May import: engine.config and the libraries the files need (transformers and diffusers only
inside the functions that load them). Main entry points: `wan.WanModel`, `magi.MagiModel`,
`attention` (the one runtime type the models see), `rope` / `magi_rope`, `text_encoder`,
`vae.StreamingDecoder` (Wan's VAE), `magi_vae.MagiVae` and
`magi_vae_tiles.MagiStreamingDecoder` (MAGI-1's), `flops`, `random_init.init_random_`, and `checkpoints/`.
"""
