"""FP8 (e4m3) quantization of activations and weights, and the scaled matmuls.

Scales follow the checkpoints' convention: a float value is its FP8 code times its
scale (`weight_scale`, and DeepSeek's `weight_scale_inv`, are both multiplied in).
The torch references here run anywhere (CPU too) and define what the fast paths
compute: `torch._scaled_mm` on CUDA for per-token x per-channel scales, the Triton
kernel in triton_kernels/fp8_block_gemm.py for 128x128-style block scales.
"""

from __future__ import annotations

import torch

from radixserve.layers.lazy_kernels import triton_kernel

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# A row of zeros gets this scale rather than zero, so dividing by it stays finite.
MIN_SCALE = 1e-12


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in FP8, saturated at the format's range (scale broadcasts over x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, scale [M, 1] float32) with one dynamic scale per row of x [M, K]."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_with_scale(x, scale), scale


def quantize_per_token_group(x: torch.Tensor, group: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q [M, K], scale [M, ceil(K / group)] float32): one scale per row and group of
    `group` consecutive columns (DeepSeek-V3's activation scheme)."""
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    x_q = quantize_with_scale(padded, scale.unsqueeze(-1)).view(m, groups * group)[:, :k]
    return x_q.contiguous(), scale


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q [N, K], scale [N, 1] float32): one scale per output row."""
    return quantize_per_token(w)


def scaled_mm_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                        w_scale: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q * x_scale) @ (w_q * w_scale).T + bias, for x_scale [M, 1] (or one value) and
    w_scale [N, 1] (or one value); products summed in float32."""
    out = (x_q.float() @ w_q.float().t()) * x_scale.float().reshape(-1, 1) \
        * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
              w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """scaled_mm_reference's product; on CUDA through torch._scaled_mm (row-wise
    scales), which needs bf16 output and K, N multiples of 16."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if x_q.is_cuda and out_dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0:
        scale_a = x_scale.float().reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
        out = torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b,
                               out_dtype=out_dtype)
        # Added apart: not every torch build takes a bias with row-wise scales.
        return out if bias is None else out + bias.to(out_dtype)
    return scaled_mm_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def block_scaled_mm_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                              w_scale: torch.Tensor, block: tuple[int, int],
                              bias: torch.Tensor | None, out_dtype: torch.dtype
                              ) -> torch.Tensor:
    """x [M, K] with scales [M, ceil(K / bk)] times w [N, K] with scales
    [ceil(N / bn), ceil(K / bk)], both dequantized to float32."""
    bn, bk = block
    n, k = w_q.shape
    x = x_q.float() * x_scale.repeat_interleave(bk, dim=1)[:, :k]
    w_s = w_scale.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    out = x @ (w_q.float() * w_s).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _kernel_steps(bk: int) -> bool:
    """Whether the Triton kernel can take bk as its K step: a power of two >= 32."""
    return bk >= 32 and bk & (bk - 1) == 0


def block_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                    w_scale: torch.Tensor, block: tuple[int, int],
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """block_scaled_mm_reference's product: the Triton kernel on CUDA for blocks whose K
    side it can step (real checkpoints use 128), else the reference."""
    kernel = (triton_kernel("radixserve.layers.triton_kernels.fp8_block_gemm",
                            "w8a8_block_matmul") if x_q.is_cuda and _kernel_steps(block[1])
              else None)
    if kernel is None:
        return block_scaled_mm_reference(x_q, x_scale, w_q, w_scale, block, bias, out_dtype)
    return kernel(x_q, x_scale, w_q, w_scale, block, bias, out_dtype)
