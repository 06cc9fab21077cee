"""Block sizes for the fused MoE kernel, by problem shape and token count.

`TUNED[(device, dtype, E, I, H, top_k)]` maps a token-count bucket to a config; the
first bucket >= the batch's tokens is used. `tests/gpu/bench_moe.py --tune` sweeps the
candidates on a GPU and prints entries in this format to paste here.

The Qwen3-30B-A3B entries (128 experts, I=768 per rank at tp 1, H=2048, top-8) are
starting points chosen by shape, not yet measured: few tokens per expert wants a small
BLOCK_M (most blocks are padding otherwise) and wide N/K tiles to stream weights; many
tokens per expert wants the large square tiles of a dense GEMM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class MoEKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


_QWEN3_30B_A3B_H100 = {
    16: MoEKernelConfig(16, 64, 128, 1, 4, 4),
    64: MoEKernelConfig(16, 128, 128, 1, 4, 3),
    256: MoEKernelConfig(32, 128, 64, 8, 4, 3),
    1024: MoEKernelConfig(64, 128, 64, 8, 4, 3),
    1 << 62: MoEKernelConfig(128, 128, 64, 8, 8, 3),
}

TUNED: dict[tuple[str, str, int, int, int, int], dict[int, MoEKernelConfig]] = {
    ("NVIDIA H100 80GB HBM3", "bfloat16", 128, 768, 2048, 8): _QWEN3_30B_A3B_H100,
}


def _default(tokens: int, top_k: int, num_experts: int, device: torch.device
             ) -> MoEKernelConfig:
    if device.type != "cuda":
        # The CPU interpreter runs only in tests: small tiles so that tiny shapes still
        # span several blocks in M, N and K.
        return MoEKernelConfig(16, 16, 16, 2, 1, 1)
    per_expert = tokens * top_k / num_experts
    if per_expert <= 16:
        return MoEKernelConfig(16, 64, 128, 1, 4, 4)
    if per_expert <= 64:
        return MoEKernelConfig(32, 128, 64, 8, 4, 3)
    return MoEKernelConfig(64, 128, 64, 8, 4, 3)


def get_moe_config(num_experts: int, inter: int, hidden: int, top_k: int, tokens: int,
                   dtype: torch.dtype, device: torch.device) -> MoEKernelConfig:
    """The tuned config for this shape on this GPU if there is one, else a heuristic."""
    if device.type == "cuda":
        key = (_device_name(device.index), str(dtype).removeprefix("torch."),
               num_experts, inter, hidden, top_k)
        table = TUNED.get(key)
        if table is not None:
            return table[min(b for b in table if b >= tokens)]
    return _default(tokens, top_k, num_experts, device)


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)
