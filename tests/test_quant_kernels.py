"""The quantization kernels against their torch references, on small awkward shapes.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 is set
before they are imported). The interpreter computes bf16 `tl.dot` wrongly (triton 3.9,
see test_triton_kernels_gemv.py), so the int4 GEMM's tensor-core path is checked in fp16
here; FP8 operands are exact in float32 products.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.quantization import fp8_ops  # noqa: E402
from radixserve.layers.quantization.int4_packing import (  # noqa: E402
    dequantize_reference, int4_matmul_reference, pack_rows)
from radixserve.layers.triton_kernels.fp8_block_gemm import (  # noqa: E402
    per_token_group_quant_fp8, w8a8_block_matmul)
from radixserve.layers.triton_kernels.int4_gemm import int4_gemm, int4_gemv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("m,k,group", [(1, 100, 32), (5, 64, 64), (3, 50, 16), (2, 37, 37)])
def test_group_quant_equals_reference(m: int, k: int, group: int) -> None:
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3).to(DEVICE)
    x[0, : min(group, k)] = 0.0  # an all-zero group keeps a finite scale
    q, s = per_token_group_quant_fp8(x, group)
    q_ref, s_ref = fp8_ops.quantize_per_token_group(x, group)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    differ = q.float() != q_ref.float()
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter's float32 -> e4m3 cast (triton 3.9) rounds a value that
        # should round up to a power of two down to the binade below; the GPU's cvt
        # rounds to nearest. Only those values may differ here.
        ref = q_ref.float()[differ]
        assert (ref.abs().log2() == ref.abs().log2().round()).all()
        assert torch.equal(q.float()[differ], ref / 2)
    else:
        assert not differ.any()
    # The reference dequantizes to within e4m3's rounding of the input.
    deq = q_ref.float() * s.repeat_interleave(group, dim=1)[:, :k]
    assert ((deq - x).abs() <= x.abs() * 2 ** -4 + s.max() * 2 ** -9).all()


def _fp8_block_operands(m: int, n: int, k: int, block: tuple[int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    bn, bk = block
    x_q, x_s = fp8_ops.quantize_per_token_group(x, bk)
    w_s = torch.rand(-(-n // bn), -(-k // bk), generator=gen) * 0.01 + 1e-3
    w_q = fp8_ops.quantize_with_scale(
        w, w_s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k])
    return [t.to(DEVICE) for t in (x_q, x_s, w_q, w_s)]


@pytest.mark.parametrize("m,n,k,block,bias", [
    (1, 40, 96, (32, 32), False),     # decode row, N ragged against the 64-wide tile
    (19, 70, 80, (32, 32), True),     # ragged M, N and K (K ends mid-block)
    (33, 128, 64, (48, 32), False),   # bn not a multiple of the tile's N
    (4, 24, 200, (128, 128), True),   # blocks larger than the layer (one ragged block)
    (2, 40, 112, (32, 32), True),     # decode: K split over programs (default split)
])
@pytest.mark.parametrize("split_k", [None, 3])
def test_fp8_block_matmul_equals_reference(m, n, k, block, bias, split_k) -> None:
    x_q, x_s, w_q, w_s = _fp8_block_operands(m, n, k, block, seed=m * n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(DEVICE) if bias else None
    for dtype in (torch.float32, torch.float16):
        out = w8a8_block_matmul(x_q, x_s, w_q, w_s, block, b, dtype, split_k=split_k)
        ref = fp8_ops.block_scaled_mm_reference(x_q, x_s, w_q, w_s, block, b, torch.float32)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_fp8_block_matmul_rejects_a_k_block_it_cannot_step() -> None:
    for bk in (24, 16):  # not a power of two; too small a step for an FP8 tl.dot
        x_q, x_s, w_q, w_s = _fp8_block_operands(2, 16, 48, (16, bk), seed=0)
        with pytest.raises(ValueError, match=f"block K size {bk} must be a power of two >= 32"):
            w8a8_block_matmul(x_q, x_s, w_q, w_s, (16, bk), None, torch.float32)


def test_scaled_mm_reference_is_the_dequantized_product() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 48, generator=gen), torch.randn(24, 48, generator=gen)
    x_q, x_s = fp8_ops.quantize_per_token(x)
    w_q, w_s = fp8_ops.quantize_weight_per_channel(w)
    out = fp8_ops.scaled_mm(x_q, x_s, w_q, w_s, None, torch.float32)
    ref = (x_q.float() * x_s) @ (w_q.float() * w_s).t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(out, x @ w.t()) < 0.05  # and e4m3 rounding keeps it near the float one


def _int4_operands(m: int, n: int, k: int, group: int, act_order: bool, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (groups, n), generator=gen).to(torch.float16)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    x = torch.randn(m, k, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (x, pack_rows(q), zeros, scales, g_idx)]


def test_int4_reference_dequantizes_each_row_by_its_group() -> None:
    x, qweight, zeros, scales, g_idx = _int4_operands(1, 8, 16, 8, True, torch.float32, 0)
    w = dequantize_reference(qweight.cpu(), zeros.cpu(), scales.cpu(), g_idx.cpu())
    from radixserve.layers.quantization.int4_packing import unpack_rows

    q = unpack_rows(qweight.cpu())
    for k in (0, 5, 15):
        g = int(g_idx[k])
        expected = (q[k].float() - zeros[g].float().cpu()) * scales[g].float().cpu()
        assert torch.equal(w[k], expected)


@pytest.mark.parametrize("m,n,k,group,act_order,bias", [
    (3, 40, 96, 32, False, False),    # N ragged against the tile
    (17, 24, 72, 24, True, True),     # act-order, ragged M and K against BLOCK_K
    (5, 56, 200, 40, False, True),    # K neither a power of two nor tile-aligned
])
def test_int4_gemm_equals_reference(m, n, k, group, act_order, bias) -> None:
    x, qweight, zeros, scales, g_idx = _int4_operands(m, n, k, group, act_order,
                                                      torch.float16, seed=m + n)
    b = torch.randn(n).to(DEVICE, torch.float16) if bias else None
    out = int4_gemm(x, qweight, zeros, scales, g_idx, b, block_n=32, block_k=32)
    ref = int4_matmul_reference(x.float(), qweight, zeros, scales, g_idx,
                                None if b is None else b.float())
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,group,act_order,split_k", [
    (1, 40, 96, 32, False, None),     # default split
    (1, 24, 200, 40, True, 3),        # act-order, the last split short
    (2, 32, 64, 64, False, 5),        # more splits than K blocks: empty ones
])
def test_int4_gemv_equals_reference(dtype, m, n, k, group, act_order, split_k) -> None:
    x, qweight, zeros, scales, g_idx = _int4_operands(m, n, k, group, act_order, dtype,
                                                      seed=k)
    out = int4_gemv(x, qweight, zeros, scales, g_idx, block_n=16, block_k=16,
                    split_k=split_k)
    ref = int4_matmul_reference(x.float(), qweight, zeros, scales, g_idx)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
