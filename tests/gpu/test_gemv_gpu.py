"""The decode GEMV and the fused q/k norm + RoPE on CUDA, at the Qwen3 shapes, in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixserve.layers.layernorm import RMSNorm  # noqa: E402
from radixserve.layers.linear_dispatch import GEMV_MAX_ROWS, linear, rmsnorm_linear  # noqa: E402
from radixserve.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from radixserve.layers.triton_kernels import apply_rotary_, fused_add_rmsnorm, rmsnorm  # noqa: E402
from radixserve.layers.triton_kernels.gemv import gemv, gemv_reference, rmsnorm_gemv  # noqa: E402
from radixserve.layers.triton_kernels.qk_norm_rotary import qk_norm_rotary_  # noqa: E402

pytestmark = [pytest.mark.gpu]
DEVICE = torch.device("cuda")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (12288, 4096), (1024, 151936),
                                 (2048, 1024), (3072, 1024), (1000, 333)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_model_shapes(m: int, k: int, n: int) -> None:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out.copy_(gemv(x, w, b))
    assert rel_err(out, gemv_reference(x, w, b)) < 5e-3


def test_dispatch_takes_gemv_for_few_rows_only() -> None:
    torch.manual_seed(0)
    w = torch.randn(512, 256, device=DEVICE, dtype=torch.bfloat16)
    few = torch.randn(GEMV_MAX_ROWS, 256, device=DEVICE, dtype=torch.bfloat16)
    many = torch.randn(GEMV_MAX_ROWS + 1, 256, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(linear(few, w), gemv(few, w))
    assert torch.equal(linear(many, w), F.linear(many, w))
    w32, x32 = w.float(), few.float()  # float32 stays on cuBLAS (exact HF parity tests)
    assert torch.equal(linear(x32, w32), F.linear(x32, w32))


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_qk_norm_rotary_equals_unfused_kernels(tokens: int) -> None:
    torch.manual_seed(tokens)
    heads, kv_heads, d = 32, 8, 128
    rope = RotaryEmbedding(d, d, 4096, 1e6).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q_w = torch.rand(d, device=DEVICE, dtype=torch.bfloat16) + 0.5
    k_w = torch.rand(d, device=DEVICE, dtype=torch.bfloat16) + 0.5
    q, k = qkv[:, :heads * d], qkv[:, heads * d:(heads + kv_heads) * d]
    ref_q = rmsnorm(q.reshape(-1, d), q_w, 1e-6).view(tokens, -1)
    ref_k = rmsnorm(k.reshape(-1, d), k_w, 1e-6).view(tokens, -1)
    apply_rotary_(ref_q, ref_k, positions, rope.cos_sin_cache, True, d)
    qk_norm_rotary_(q, k, positions, rope.cos_sin_cache, q_w, k_w, 1e-6, True)
    # Same rounding steps; only the fp32 sum of squares may differ in its last bit.
    for got, want in ((q, ref_q), (k, ref_k)):
        assert (got != want).float().mean().item() < 1e-3
        assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("k,n", [(1024, 4096), (1024, 6144), (4096, 6144), (4096, 24576)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_gemv_equals_norm_kernel_then_gemv(m: int, k: int, n: int,
                                                   with_residual: bool) -> None:
    """Qwen3's qkv and gate/up shapes (0.6B: hidden 1024; 8B: 4096)."""
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) * 3
    residual = torch.randn_like(x) * 3 if with_residual else None
    norm_w = torch.rand(k, device=DEVICE, dtype=torch.bfloat16) + 0.5
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k ** 0.5
    out, h = rmsnorm_gemv(x, residual, norm_w, 1e-6, w)
    if with_residual:
        normed, want_h = fused_add_rmsnorm(x.clone(), residual.clone(), norm_w, 1e-6)
    else:
        normed, want_h = rmsnorm(x, norm_w, 1e-6), x
    want = gemv(normed, w)
    assert torch.equal(h, want_h)
    if k == 1024:
        # Both kernels sum a row's squares over 4 warps in the same layout (the PTX
        # of the two reductions is the same): the same bits.
        assert torch.equal(out, want)
    else:
        # The norm kernel spreads a 4096 row over 16 warps, the GEMV over 4: the fp32
        # sum may differ in its last bit, and a normalised element by one bf16 ulp.
        assert rel_err(out, want) < 1e-3


def test_rmsnorm_linear_fuses_for_few_rows_only() -> None:
    torch.manual_seed(1)
    norm = RMSNorm(1024).to(DEVICE, torch.bfloat16)
    norm.weight.data = torch.rand(1024, device=DEVICE, dtype=torch.bfloat16) + 0.5
    w = torch.randn(2048, 1024, device=DEVICE, dtype=torch.bfloat16) / 32
    for rows in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 1024, device=DEVICE, dtype=torch.bfloat16)
        residual = torch.randn_like(x)
        normed, want_h = norm(x.clone(), residual.clone())
        out, h = rmsnorm_linear(x, residual, norm, w)
        assert torch.equal(h, want_h) and torch.equal(out, linear(normed, w))
        if rows <= GEMV_MAX_ROWS:  # fused: x and the residual are left as they were
            assert h.data_ptr() not in (x.data_ptr(), residual.data_ptr())
