"""Which matmul a linear layer runs: the skinny Triton GEMV for decode-sized batches on
CUDA, F.linear (cuBLAS, or the CPU's BLAS) for everything else.

At a few rows a linear layer only streams its weight. On an H100, in a CUDA graph, cuBLAS
(F.linear, [N, K] weight) streams the Qwen3-8B shapes at 2.0-2.8 TB/s and the GEMV at
2.5-3.1 (tests/gpu/bench_gemv.py); at the 0.6B model's small shapes both are
latency-bound, the GEMV less so. Prefill and large decode batches are
compute-bound and stay on cuBLAS, and so does float32 (the GPU parity tests compare it
with HF exactly, and the GEMV's tensor-core path would round it to tf32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from radixserve.layers.activation import silu_and_mul

# Up to this many rows the GEMV beats cuBLAS at every Qwen3 shape on an H100.
GEMV_MAX_ROWS = 16
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_and_mul_input: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] and weight [N, K]. With
    silu_and_mul_input, x is [..., 2K] = cat(gate, up) and the input is silu(gate) * up
    (the GEMV applies it as it reads x; otherwise it runs first)."""
    if (x.is_cuda and x.dtype in _GEMV_DTYPES and weight.dtype == x.dtype
            and x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and weight.is_contiguous()):
        kernel = _triton_gemv()
        if kernel is not None:
            rows = x.reshape(-1, x.shape[-1])
            if rows.stride(-1) == 1:
                out = kernel(rows, weight, bias, silu_and_mul_input=silu_and_mul_input)
                return out.view(*x.shape[:-1], weight.shape[0])
    if silu_and_mul_input:
        x = silu_and_mul(x)
    return F.linear(x, weight, bias)


@functools.cache
def _triton_gemv() -> Callable[..., torch.Tensor] | None:
    # Imported lazily (once) so CPU-only installs never import triton.
    try:
        from radixserve.layers.triton_kernels.gemv import gemv
    except ImportError:
        return None
    return gemv
