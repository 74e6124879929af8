"""Reading released weights into the networks: every Wan layout, MAGI-1's, LoRA merges; tensor by
tensor, each value checked (`validate.CheckpointError`).

May import: torch, safetensors and the rest of engine.models' files layer. Main entry points:
`wan.load_weights` / `wan.read_checkpoint`, `magi.open_magi_checkpoint`, `lora.merge_lora`.
"""
