"""The collectives of Ulysses sequence parallelism over one sp group (engine/runtime/sharding.py).

Two backends, chosen with `--sp-backend` and reported at start-up:
* `yunchang`: yunchang's `all_to_all_4D`, the sequence <-> head all-to-all its Ulysses and USP
  attention are built on. Its attention classes themselves do not fit here: they attend q, k and
  v of one sequence without a mask, while a streaming forward attends a KV cache of committed
  frames plus the in-flight blocks under a block-causal mask (and per-chunk ranges for MAGI-1);
  so arcade uses yunchang's exchange and keeps its own attention. It runs on gloo and NCCL.
* `torch`: the same exchange written on `all_to_all_single`, for machines without yunchang (it
  is an optional package).
xfuser's long-context attention needs CUDA builds and a flash-attention kernel, and has the same
attention-interface mismatch; it is not used.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

BACKENDS = ("auto", "yunchang", "torch")


def yunchang_available() -> bool:
    return importlib.util.find_spec("yunchang") is not None


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown sp backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        return "yunchang" if yunchang_available() else "torch"
    if name == "yunchang" and not yunchang_available():
        raise ValueError("--sp-backend yunchang: the yunchang package is not installed (pip install yunchang)")
    return name


class GroupExchange:
    """`SeqExchange` over a process group (the sp dimension of the device mesh)."""

    def __init__(self, group, backend: str = "auto"):
        self.group, self.backend = group, resolve_backend(backend)
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def heads_for_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # [B, n, H, Dh] -> [B, sp*n, H/sp, Dh]
        if self.backend == "yunchang":
            from yunchang.comm.all_to_all import all_to_all_4D

            return all_to_all_4D(x, scatter_idx=2, gather_idx=1, group=self.group)
        B, n, H, Dh = x.shape
        send = x.reshape(B, n, self.size, H // self.size, Dh).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)  # [sp: source rank, B, n, H/sp, Dh]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 0, 2, 3, 4).reshape(B, self.size * n, H // self.size, Dh)

    def tokens_for_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, sp*n, H/sp, Dh] -> [B, n, H, Dh]
        if self.backend == "yunchang":
            from yunchang.comm.all_to_all import all_to_all_4D

            return all_to_all_4D(x, scatter_idx=1, gather_idx=2, group=self.group)
        B, N, h, Dh = x.shape
        send = x.reshape(B, self.size, N // self.size, h, Dh).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)  # [sp: source rank (its head group), B, n, h, Dh]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(B, N // self.size, self.size * h, Dh)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)
