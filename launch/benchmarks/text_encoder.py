"""Text encoder on the host: what `--text-encoder-device cpu` adds to a prompt switch (umT5-XXL).

    python -m launch.bench text-encoder                     # 2 of umT5-XXL's 24 layers, scaled to 24
    python -m launch.bench text-encoder --layers 24         # the whole encoder (11.4 GB in bf16)

Builds transformers' UMT5EncoderModel at umT5-XXL's shape (d_model 4096, d_ff 10240 gated-GELU,
64 heads of 64, 32 relative-position buckets, the 256,384-token vocabulary) with random weights,
`--layers` of its 24 layers, and times one encode on this CPU at each of `--threads`, in each of
`--dtypes`. A prompt switch encodes one prompt, padded to 512 tokens as arcade (and Wan) pad it,
so its cost is that of 512 tokens whatever the prompt's length (`padded` rows); `prompt` rows run
only the `--prompt-tokens` a typical prompt has, what an encoder that cut the padding would pay.
The encode scales with the layers (the embedding lookup and the final norm are negligible), so
`scaled_s` = seconds x 24 / layers estimates the whole encoder. Nothing is loaded from disk; the
model is freed after each dtype. Load matters on a shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0)  # fmt: skip
TEXT_LEN = 512
COLUMNS = ["dtype", "threads", "tokens", "layers", "seconds", "scaled_s", "gflops"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=2, help="umT5-XXL layers built (24 is the whole encoder)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()], help="torch threads")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="weights and compute dtype")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens of a typical prompt (prompt rows)")
    parser.add_argument("--repeats", type=int, default=2, help="timed encodes per row (after one warm-up)")


def build(layers: int, dtype: torch.dtype):
    """umT5-XXL's shape with `layers` layers and seeded uniform weights (no denormals, no NaN)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**{**UMT5_XXL, "num_layers": layers})
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = model.to(dtype).to_empty(device="cpu").eval()  # cast on meta: no float32 copy on the host
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            fan_in = param.shape[-1]
            param.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=generator)
    return model


def encode_seconds(model, tokens: int, repeats: int) -> float:
    """Median seconds of one encode of `tokens` real tokens padded to TEXT_LEN, as arcade encodes."""
    ids = torch.randint(1, 1000, (1, TEXT_LEN))
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask[:, :tokens] = 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up: allocator, kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def prompt_seconds(model, tokens: int, repeats: int) -> float:
    """Median seconds of an encode of the prompt's own `tokens` (no padding)."""
    ids = torch.randint(1, 1000, (1, tokens))
    with torch.no_grad():
        model(input_ids=ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layer_gflop(tokens: int) -> float:
    """One layer's matmul GFLOP for `tokens` (projections, gated FFN, attention over the tokens)."""
    d, f, inner = UMT5_XXL["d_model"], UMT5_XXL["d_ff"], UMT5_XXL["num_heads"] * UMT5_XXL["d_kv"]
    linear = 2 * tokens * (4 * d * inner + 3 * d * f)
    return (linear + 4 * tokens * tokens * inner) / 1e9


def run(args: argparse.Namespace):
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model = build(args.layers, dtype)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for kind, tokens in (("padded", TEXT_LEN), ("prompt", args.prompt_tokens)):
                measure = encode_seconds if kind == "padded" else prompt_seconds
                seconds = measure(model, tokens, args.repeats)
                row = {"dtype": name, "threads": threads, "tokens": f"{tokens} ({kind})", "layers": args.layers,
                       "seconds": seconds, "scaled_s": seconds * UMT5_XXL["num_layers"] / args.layers,
                       "gflops": args.layers * layer_gflop(tokens) / seconds}  # fmt: skip
                rows.append(row)
                print(f"{name}, {threads} thread(s), {row['tokens']}: {seconds:.2f} s for {args.layers} layers "
                      f"-> {row['scaled_s']:.1f} s for 24", flush=True)  # fmt: skip
        del model
        gc.collect()
    load = os.getloadavg()
    print(f"cpu, load average {load[0]:.1f} on {os.cpu_count()} cores (shared): seconds are this machine's")
    settings = {"layers": args.layers, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                "load_average": load, "cores": os.cpu_count(), "shape": UMT5_XXL}  # fmt: skip
    return rows, COLUMNS, settings
