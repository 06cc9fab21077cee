"""Which matmul a linear layer runs: the skinny Triton GEMV for single rows (batch-1
decode) on CUDA, F.linear (cuBLAS, or the CPU's BLAS) for everything else.

At one row a linear layer only streams its weight. On an H100, in a CUDA graph, the
GEMV streams the Qwen3-8B shapes faster than cuBLAS (F.linear, [N, K] weight) does
(tests/gpu/bench_gemv.py, docs/benchmarks.md); at the 0.6B model's small shapes both
are latency-bound, the GEMV less so. From two rows on cuBLAS wins in the decode step (see
GEMV_MAX_ROWS). Prefill and decode batches stay on cuBLAS, and so does float32 (the GPU
parity tests compare it with HF exactly, and the GEMV's tensor-core path would round it
to tf32).

Where the GEMV runs it also takes in the elementwise op before it: SiLU-and-mul
(`linear(..., silu_and_mul_input=True)`) and the residual add + RMSNorm
(`rmsnorm_linear`). Each saves a kernel of a few microseconds, which at decode sizes is
mostly launch latency.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from radixserve.envs import envs
from radixserve.layers.activation import silu_and_mul
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.lazy_kernels import triton_kernel

# Up to this many rows the GEMV beats cuBLAS at every Qwen3 shape on an H100. Its
# one-row (FMA) kernel does; its tensor-core kernel for 2-16 rows did in isolation
# (tests/gpu/bench_gemv.py) but not in the decode step, where Qwen3-8B and Qwen3-0.6B at
# batch 2-8 were slower with it than with cuBLAS (docs/benchmarks.md, "Third pass"). So
# only single rows take the GEMV.
GEMV_MAX_ROWS = 1
_GEMV_DTYPES = (torch.bfloat16, torch.float16)
# Tests add "cpu" to run the GEMV paths in Triton's interpreter.
_GEMV_DEVICES = ("cuda",)
# RADIXSERVE_DISABLE_NORM_GEMV=1 runs the RMSNorm as its own kernel (for A/B timing).
FUSE_RMSNORM = not envs.RADIXSERVE_DISABLE_NORM_GEMV.get()
# The fused norm pays where a kernel launch is a large share of the projection: every
# GEMV program re-reads the whole rows (x and residual) for their rms, a cost that grows
# with the hidden size times the programs. On an H100 at decode-bs1 it made Qwen3-0.6B
# (hidden 1,024) faster and Qwen3-8B (hidden 4,096) slower (docs/benchmarks.md). So only
# hidden sizes up to 2,048 fuse.
NORM_GEMV_MAX_HIDDEN = 2048


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_and_mul_input: bool = False, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] and weight [N, K]. With
    silu_and_mul_input, x is [..., 2K] = cat(gate, up) and the input is silu(gate) * up
    (the GEMV applies it as it reads x; otherwise it runs first). With `out` (contiguous,
    [..., N] in x's dtype) the product is written there and `out` returned."""
    if out is not None and (out.shape != (*x.shape[:-1], weight.shape[0])
                            or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {(*x.shape[:-1], weight.shape[0])} "
                         f"{x.dtype}; got {tuple(out.shape)} {out.dtype}")
    rows = _gemv_rows(x, weight)
    if rows is not None:
        result = _gemv_module().gemv(rows, weight, bias, silu_and_mul_input=silu_and_mul_input,
                                     out=None if out is None else out.view(rows.shape[0], -1))
        return result.view(*x.shape[:-1], weight.shape[0])
    if silu_and_mul_input:
        x = silu_and_mul(x)
    if out is None:
        return F.linear(x, weight, bias)
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)
    return out


def rmsnorm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                   weight: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(h), weight, bias), h) for h = x + residual, or x without a residual.

    Where the GEMV runs, the add and the norm happen inside it, bit for bit as the norm's
    own kernel computes them, and h is a new tensor. Elsewhere this is `norm.add_norm`
    (which may update x and residual in place) followed by `linear`.
    """
    fuse = FUSE_RMSNORM and x.shape[-1] <= NORM_GEMV_MAX_HIDDEN
    rows = _gemv_rows(x, weight) if fuse else None
    res_rows = None if residual is None else residual.reshape(-1, x.shape[-1])
    if rows is not None and (res_rows is None or (res_rows.shape == rows.shape
                                                  and res_rows.dtype == x.dtype
                                                  and res_rows.stride(-1) == 1)):
        out, h = _gemv_module().rmsnorm_gemv(rows, res_rows, norm.weight,
                                             norm.variance_epsilon, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0]), h.view(x.shape)
    x, residual = norm.add_norm(x, residual)
    return linear(x, weight, bias), residual


def _gemv_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x as [M, K] rows when the GEMV takes this product, else None."""
    if (x.device.type not in _GEMV_DEVICES or x.dtype not in _GEMV_DTYPES
            or weight.dtype != x.dtype or x.numel() > GEMV_MAX_ROWS * x.shape[-1]
            or not weight.is_contiguous() or _gemv_module() is None):
        return None
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else None


def _gemv_module() -> ModuleType | None:
    return triton_kernel("radixserve.layers.triton_kernels.gemv")
