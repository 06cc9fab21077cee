"""The fused q/k RMSNorm + RoPE kernel against the unfused references.

Without CUDA it runs in Triton's CPU interpreter (TRITON_INTERPRET=1 is set before the
kernel module is imported).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.layernorm import RMSNorm  # noqa: E402
from radixserve.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from radixserve.layers.triton_kernels.qk_norm_rotary import (  # noqa: E402
    qk_norm_rotary_, qk_norm_rotary_reference)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,is_neox,dtype", [
    (1, 4, 2, 16, True, torch.float32),
    (5, 3, 1, 32, False, torch.bfloat16),   # head counts that are not powers of two
    (17, 6, 3, 16, True, torch.bfloat16),
])
def test_qk_norm_rotary(tokens: int, heads: int, kv_heads: int, head_dim: int, is_neox: bool,
                        dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens * 31 + heads)
    rope = RotaryEmbedding(head_dim, head_dim, 64, 10000.0, is_neox)
    # q and k as row-strided views of one fused qkv output, as the model passes them.
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width, generator=g) * 3).to(DEVICE, dtype)
    q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    positions = torch.randint(0, 64, (tokens,), generator=g).to(DEVICE)
    q_w = (1 + torch.randn(head_dim, generator=g) / 4).to(DEVICE, dtype)
    k_w = (1 + torch.randn(head_dim, generator=g) / 4).to(DEVICE, dtype)
    cache = rope.cos_sin_cache.to(DEVICE)
    ref_q, ref_k = qk_norm_rotary_reference(q, k, positions, cache, q_w, k_w, 1e-6, is_neox)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    qk_norm_rotary_(q, k, positions, cache, q_w, k_w, 1e-6, is_neox)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(q, ref_q) < tol and rel_err(k, ref_k) < tol
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


def test_forward_with_qk_norm_matches_unfused_layers() -> None:
    g = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(16, 16, 32, 10000.0, True).to(DEVICE)
    q_norm, k_norm = RMSNorm(16).to(DEVICE), RMSNorm(16).to(DEVICE)
    q_norm.weight.data = (1 + torch.randn(16, generator=g) / 4).to(DEVICE)
    q = torch.randn(3, 2 * 16, generator=g).to(DEVICE)
    k = torch.randn(3, 16, generator=g).to(DEVICE)
    positions = torch.tensor([0, 5, 31], device=DEVICE)
    want = rope.forward_native(positions, q_norm.forward_native(q.reshape(-1, 16)).view(q.shape),
                               k_norm.forward_native(k.reshape(-1, 16)).view(k.shape))
    got = rope.forward_with_qk_norm(positions, q.clone(), k.clone(), q_norm, k_norm)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
