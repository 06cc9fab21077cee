"""The rotary kernels' KV write (layers/kv_write.py): the pool rows they write equal
what `store_kv` writes after the unfused kernel, bit for bit, and nothing else changes.

Without CUDA they run in Triton's CPU interpreter (TRITON_INTERPRET=1 is set before the
kernel modules are imported).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.attention.triton_ops.kv_store import store_kv  # noqa: E402
from radixserve.layers.kv_write import KVWrite  # noqa: E402
from radixserve.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from radixserve.layers.triton_kernels.qk_norm_rotary import qk_norm_rotary_  # noqa: E402
from radixserve.layers.triton_kernels.rotary import apply_rotary_  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SLOTS = 64


def _inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # q, k and v as row-strided views of one fused qkv output, as the model passes them.
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width, generator=g) * 3).to(DEVICE, dtype)
    positions = torch.randint(0, 64, (tokens,), generator=g).to(DEVICE)
    # Distinct slots in a shuffled order, never the reserved slot 0.
    loc = (torch.randperm(SLOTS - 1, generator=g)[:tokens] + 1).to(DEVICE)
    return qkv, positions, loc, g


def _run(kernel: str, qkv: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int,
         head_dim: int, is_neox: bool, g: torch.Generator, kv_write: KVWrite | None) -> None:
    q = qkv[:, :heads * head_dim]
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    v = qkv[:, (heads + kv_heads) * head_dim:]
    cache = RotaryEmbedding(head_dim, head_dim, 64, 10000.0, is_neox).cos_sin_cache.to(DEVICE)
    if kernel == "qk_norm_rotary":
        g2 = torch.Generator().manual_seed(7)
        q_w = (1 + torch.randn(head_dim, generator=g2) / 4).to(DEVICE, qkv.dtype)
        k_w = (1 + torch.randn(head_dim, generator=g2) / 4).to(DEVICE, qkv.dtype)
        qk_norm_rotary_(q, k, positions, cache, q_w, k_w, 1e-6, is_neox, kv_write=kv_write,
                        v=v if kv_write is not None else None)
    else:
        apply_rotary_(q, k, positions, cache, is_neox, head_dim, kv_write=kv_write,
                      v=v if kv_write is not None else None)


@pytest.mark.parametrize("kernel", ["qk_norm_rotary", "rotary"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,is_neox,dtype,pool_dtype", [
    (1, 4, 2, 16, True, torch.bfloat16, torch.bfloat16),
    (3, 3, 1, 32, False, torch.float32, torch.float32),   # head counts not powers of two
    (17, 6, 3, 16, True, torch.bfloat16, torch.bfloat16),
    (5, 4, 2, 16, True, torch.float32, torch.bfloat16),   # cast on the way into the pool
])
def test_kv_write_equals_store_after_kernel(kernel: str, tokens: int, heads: int, kv_heads: int,
                                            head_dim: int, is_neox: bool, dtype: torch.dtype,
                                            pool_dtype: torch.dtype) -> None:
    qkv, positions, loc, g = _inputs(tokens, heads, kv_heads, head_dim, dtype, tokens * 13 + heads)
    sentinel = torch.full((SLOTS, kv_heads, head_dim), -7.0, dtype=pool_dtype, device=DEVICE)

    # Unfused: the kernel in place, then the store_kv kernel (the same cast into the pool;
    # the CPU interpreter's fp32 -> bf16 cast does not round like torch's, so the torch
    # reference would differ in the last bit there).
    plain = qkv.clone()
    _run(kernel, plain, positions, heads, kv_heads, head_dim, is_neox, g, None)
    want_k, want_v = sentinel.clone(), sentinel.clone()
    kv_width = kv_heads * head_dim
    store_kv(want_k, want_v, loc,
             plain[:, heads * head_dim:][:, :kv_width].reshape(tokens, kv_heads, -1),
             plain[:, -kv_width:].reshape(tokens, kv_heads, -1))

    fused = qkv.clone()
    got_k, got_v = sentinel.clone(), sentinel.clone()
    _run(kernel, fused, positions, heads, kv_heads, head_dim, is_neox, g,
         KVWrite(got_k, got_v, loc))
    assert torch.equal(fused, plain)  # q, k rotated as before; v untouched
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # other slots too


def test_kv_write_rejects_mismatched_pool() -> None:
    qkv, positions, loc, g = _inputs(2, 4, 2, 16, torch.float32, 1)
    wrong = torch.zeros(SLOTS, 4, 16, device=DEVICE)  # 4 KV heads, k has 2
    with pytest.raises(ValueError, match="KV heads"):
        _run("rotary", qkv, positions, 4, 2, 16, True, g, KVWrite(wrong, wrong, loc))
    with pytest.raises(ValueError, match="one row per token"):
        pool = torch.zeros(SLOTS, 2, 16, device=DEVICE)
        _run("qk_norm_rotary", qkv, positions, 4, 2, 16, True, g, KVWrite(pool, pool, loc[:1]))


def test_rotary_embedding_reports_the_write() -> None:
    """forward_and_store says whether it stored: the kernel path (CUDA) stores, the
    native path (CPU tensors) leaves the store to the backend."""
    qkv, positions, loc, _ = _inputs(3, 2, 1, 16, torch.float32, 2)
    rope = RotaryEmbedding(16, 16, 64, 10000.0, True).to(DEVICE)
    pool = torch.zeros(SLOTS, 1, 16, device=DEVICE)
    _, _, stored = rope.forward_and_store(positions, qkv[:, :32], qkv[:, 32:48], qkv[:, 48:],
                                          KVWrite(pool, pool.clone(), loc))
    assert stored == (DEVICE.type == "cuda")
    # Partial rotary (rot_dim < head_dim) never stores in the kernel.
    partial = RotaryEmbedding(32, 16, 64, 10000.0, True).to(DEVICE)
    pool32 = torch.zeros(SLOTS, 1, 32, device=DEVICE)
    qkv32, positions, loc, _ = _inputs(3, 2, 1, 32, torch.float32, 3)
    _, _, stored = partial.forward_and_store(positions, qkv32[:, :64], qkv32[:, 64:96],
                                             qkv32[:, 96:], KVWrite(pool32, pool32.clone(), loc))
    assert not stored
