"""Roofline numbers measured in the same run: copy bandwidth and matmul throughput.

Decode at small batch is bound by memory (every weight read once per step), prefill by
compute (about 2 × params FLOP per token plus attention); benchmarks report their result
as a fraction of these, measured on the same GPU in the same process.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.configs.model_config import ModelConfig


def _time_cuda(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """{"copy_Bps": read+write bytes/s of a 2 GiB copy, "matmul_flops": bf16 8192³}."""
    if device.type != "cuda":
        raise ValueError("--floor needs a CUDA device")
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), 20)
    copy_bps = 2 * n / t
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = _time_cuda(lambda: a @ b, 20)
    return {"copy_Bps": copy_bps, "matmul_flops": 2 * 8192 ** 3 / t}


def model_bytes(model: nn.Module, tied_embeddings: bool) -> int:
    """Bytes one decode step reads from weights. The input embedding is a lookup of a
    few rows, so it counts only when tied (then the LM head reads all of it)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if "embed_tokens" in name and not tied_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def model_flops_per_token(mc: ModelConfig) -> float:
    """Matmul FLOPs per token of a dense decoder (2 × weights touched), no attention."""
    h, layers = mc.hidden_size, mc.num_hidden_layers
    inter = mc.hf_config.intermediate_size
    q = mc.num_attention_heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    return 2.0 * (layers * per_layer + h * mc.vocab_size)
