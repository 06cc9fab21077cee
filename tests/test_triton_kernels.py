"""Every Triton kernel against its PyTorch reference, on small awkward shapes.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 must be
set before the kernel modules are imported: it is read when @triton.jit decorates).
The interpreter computes bf16 `tl.dot` wrongly (triton 3.9), so the attention kernels
are checked here in fp32 and fp16; tests/gpu/ covers bf16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend  # noqa: E402
from radixserve.layers.attention.triton import TritonAttnBackend  # noqa: E402
from radixserve.layers.attention.triton_ops.decode_attention import (  # noqa: E402
    alloc_decode_scratch, decode_attention_fwd, decode_attention_reference)
from radixserve.layers.attention.triton_ops.extend_attention import (  # noqa: E402
    extend_attention_fwd, extend_attention_reference)
from radixserve.layers.attention.triton_ops.kv_store import (  # noqa: E402
    store_kv, store_kv_reference)
from radixserve.layers.radix_attention import RadixAttention  # noqa: E402
from radixserve.layers.triton_kernels import (  # noqa: E402
    apply_rotary_, fused_add_rmsnorm, rmsnorm, silu_and_mul)
from radixserve.layers.triton_kernels.activation import silu_and_mul_reference  # noqa: E402
from radixserve.layers.triton_kernels.rmsnorm import (  # noqa: E402
    fused_add_rmsnorm_reference, rmsnorm_reference)
from radixserve.layers.triton_kernels.rotary import apply_rotary_reference  # noqa: E402
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class PagedKV:
    """A pool filled with random K/V and requests whose tokens sit in scattered slots."""

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        size = sum(seq_lens) + 37
        num_rows = 2 * len(seq_lens) + 3
        self.rows = torch.randperm(num_rows, generator=gen)[:len(seq_lens)]  # not 0..B-1
        self.req_to_token_pool = ReqToTokenPool(num_rows, max(seq_lens) + 8, DEVICE)
        self.kv_pool = MHATokenToKVPool(size, dtype, num_kv_heads, head_dim, 1, DEVICE)
        slots = torch.randperm(size, generator=gen)[:sum(seq_lens)] + 1  # slot 0 is reserved
        self.slots: list[torch.Tensor] = []
        start = 0
        for row, n in zip(self.rows.tolist(), seq_lens):
            self.slots.append(slots[start:start + n].to(DEVICE))
            self.req_to_token_pool.write(row, 0, self.slots[-1])
            start += n
        for buf in (*self.kv_pool.k_buffer, *self.kv_pool.v_buffer):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# --- decode -------------------------------------------------------------------------

@pytest.mark.parametrize("seq_lens,heads,kv_heads,head_dim,splits,dtype", [
    ([1], 4, 4, 64, 1, torch.float32),
    ([37, 1, 70], 8, 2, 80, 4, torch.float16),
    ([5, 64, 17, 33, 2], 8, 2, 64, 8, torch.float32),
    ([200], 4, 1, 96, 16, torch.float16),
])
def test_decode_attention(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                          splits: int, dtype: torch.dtype) -> None:
    kv = PagedKV(seq_lens, kv_heads, head_dim, dtype, seed=len(seq_lens))
    q = randn(len(seq_lens), heads, head_dim, dtype=dtype, seed=1)
    seq = torch.tensor(seq_lens, device=DEVICE)
    rows = kv.rows.to(DEVICE)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((len(seq_lens), heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    mid_o, mid_lse = alloc_decode_scratch(len(seq_lens), heads, head_dim, splits, DEVICE)
    decode_attention_fwd(q, k_buf, v_buf, out, kv.req_to_token, rows, seq, 0.3, mid_o, mid_lse)
    ref = decode_attention_reference(q, k_buf, v_buf, kv.req_to_token, rows, seq, 0.3)
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_rejects_bad_group() -> None:
    q = torch.zeros(1, 6, 64, device=DEVICE)
    k = torch.zeros(4, 4, 64, device=DEVICE)
    mid = alloc_decode_scratch(1, 6, 64, 1, DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_fwd(q, k, k, q, torch.zeros(1, 4, dtype=torch.int32, device=DEVICE),
                             torch.zeros(1, dtype=torch.int64, device=DEVICE),
                             torch.ones(1, dtype=torch.int64, device=DEVICE), 1.0, *mid)


# --- extend -------------------------------------------------------------------------

@pytest.mark.parametrize("prefix_lens,extend_lens,heads,kv_heads,head_dim,dtype", [
    ([0], [1], 4, 4, 64, torch.float32),
    ([0, 13, 40], [33, 1, 19], 8, 2, 80, torch.float16),
    ([7, 0, 16, 1, 0], [16, 5, 17, 2, 31], 4, 1, 64, torch.float32),
    ([21], [45], 4, 4, 96, torch.float16),
])
def test_extend_attention(prefix_lens: list[int], extend_lens: list[int], heads: int,
                          kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    kv = PagedKV([max(p, 1) for p in prefix_lens], kv_heads, head_dim, dtype, seed=len(prefix_lens))
    total = sum(extend_lens)
    q = randn(total, heads, head_dim, dtype=dtype, seed=2)
    k = randn(total, kv_heads, head_dim, dtype=dtype, seed=3)
    v = randn(total, kv_heads, head_dim, dtype=dtype, seed=4)
    prefix = torch.tensor(prefix_lens, device=DEVICE)
    ext = torch.tensor(extend_lens, device=DEVICE)
    start = torch.cumsum(ext, 0) - ext
    rows = kv.rows.to(DEVICE)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((total, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    extend_attention_fwd(q, k, v, out, k_buf, v_buf, kv.req_to_token, rows, prefix, ext, start,
                         max(extend_lens), 0.2)
    ref = extend_attention_reference(q, k, v, k_buf, v_buf, kv.req_to_token, rows, prefix, ext, 0.2)
    assert rel_err(out, ref) < TOL[dtype]


# --- KV store -----------------------------------------------------------------------

# fp32 -> fp16 checks the cast on the way in (the interpreter rounds fp32 -> bf16 by
# truncation, so that pair is only exact on a GPU).
@pytest.mark.parametrize("tokens,kv_heads,head_dim,dtype,in_dtype", [
    (1, 1, 64, torch.float32, torch.float32), (19, 3, 80, torch.float16, torch.float32),
    (5, 8, 64, torch.bfloat16, torch.bfloat16)])
def test_store_kv(tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  in_dtype: torch.dtype) -> None:
    k_buf = randn(50, kv_heads, head_dim, dtype=dtype, seed=5)
    v_buf = randn(50, kv_heads, head_dim, dtype=dtype, seed=6)
    loc = torch.randperm(49, generator=torch.Generator().manual_seed(7))[:tokens].to(DEVICE) + 1
    k = randn(tokens, kv_heads, head_dim, dtype=in_dtype, seed=8)
    v = randn(tokens, kv_heads, head_dim, dtype=in_dtype, seed=9)
    ref_k, ref_v = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, loc, k, v)
    store_kv_reference(ref_k, ref_v, loc, k, v)
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v)


# --- elementwise kernels ------------------------------------------------------------

@pytest.mark.parametrize("rows,hidden,dtype", [(1, 64, torch.float32), (5, 100, torch.bfloat16),
                                               (3, 576, torch.float16)])
def test_rmsnorm(rows: int, hidden: int, dtype: torch.dtype) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=10)
    w = randn(hidden, dtype=dtype, seed=11)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6))
    residual = randn(rows, hidden, dtype=dtype, seed=12)
    ref_out, ref_res = fused_add_rmsnorm_reference(x, residual, w, 1e-6)
    out, res = fused_add_rmsnorm(x.clone(), residual.clone(), w, 1e-6)
    torch.testing.assert_close(res, ref_res)  # exact on a GPU; see test_store_kv on bf16
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,rot_dim,dtype", [
    (1, 4, 4, 64, 64, torch.float32), (7, 6, 2, 80, 80, torch.bfloat16),
    (3, 3, 1, 64, 32, torch.float16)])
def test_rotary(is_neox: bool, tokens: int, heads: int, kv_heads: int, head_dim: int,
                rot_dim: int, dtype: torch.dtype) -> None:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.arange(100, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)
    positions = torch.randint(0, 100, (tokens,), generator=torch.Generator().manual_seed(13))
    positions = positions.to(DEVICE)
    # q and k as strided views of one fused qkv row, as the models produce them.
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=14)
    q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    ref_q, ref_k = apply_rotary_reference(q, k, positions, cache, is_neox, head_dim)
    apply_rotary_(q, k, positions, cache, is_neox, head_dim)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


def test_rotary_matches_hf_rotate_half() -> None:
    """The neox layout is HF Llama's q * cos + rotate_half(q) * sin with cos = cat(c, c)."""
    head_dim = 16
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(10, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    q = torch.randn(3, 2 * head_dim)
    positions = torch.tensor([0, 4, 9])
    emb = torch.cat([angles, angles], -1)[positions][:, None, :]
    heads = q.view(3, 2, head_dim)
    rotate_half = torch.cat([-heads[..., head_dim // 2:], heads[..., :head_dim // 2]], -1)
    hf = (heads * emb.cos() + rotate_half * emb.sin()).view(3, -1)
    ref_q, _ = apply_rotary_reference(q, q[:, :head_dim], positions, cache, True)
    torch.testing.assert_close(ref_q, hf)


@pytest.mark.parametrize("rows,inter,dtype", [(1, 64, torch.float32), (5, 100, torch.bfloat16)])
def test_silu_and_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    x = randn(rows, 2 * inter, dtype=dtype, seed=15)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x))


# --- the backend against torch_native ---------------------------------------------------

def make_batch(mode: ForwardMode, prefix_lens: list[int], extend_lens: list[int], heads: int,
               kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
               ) -> tuple[ForwardBatch, PagedKV, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose requests have prefix_lens cached tokens and extend_lens new ones."""
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    kv = PagedKV(seq_lens, kv_heads, head_dim, dtype, seed)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(kv.slots, prefix_lens)])
    total = sum(extend_lens)
    positions = torch.cat([torch.arange(p, p + e) for p, e in zip(prefix_lens, extend_lens)])
    fb = ForwardBatch(
        forward_mode=mode, batch_size=len(seq_lens),
        input_ids=torch.zeros(total, dtype=torch.int64, device=DEVICE),
        positions=positions.to(DEVICE), req_pool_indices=kv.rows.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, device=DEVICE), out_cache_loc=out_cache_loc,
        seq_lens_cpu=seq_lens, req_to_token_pool=kv.req_to_token_pool,
        token_to_kv_pool=kv.kv_pool, attn_backend=None)
    if mode.is_extend():
        fb.extend_prefix_lens = torch.tensor(prefix_lens, device=DEVICE)
        fb.extend_seq_lens = torch.tensor(extend_lens, device=DEVICE)
        fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu = prefix_lens, extend_lens
    q = randn(total, heads * head_dim, dtype=dtype, seed=seed + 1)
    k = randn(total, kv_heads * head_dim, dtype=dtype, seed=seed + 2)
    v = randn(total, kv_heads * head_dim, dtype=dtype, seed=seed + 3)
    return fb, kv, q, k, v


def run_backend(backend: object, fb: ForwardBatch, layer: RadixAttention, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    return layer(q, k, v, fb)


@pytest.mark.parametrize("mode,prefix_lens,extend_lens,heads,kv_heads,head_dim,dtype", [
    (ForwardMode.EXTEND, [0, 12, 30], [9, 1, 20], 8, 2, 64, torch.float32),
    (ForwardMode.MIXED, [40, 3], [1, 18], 4, 4, 80, torch.float16),
    (ForwardMode.DECODE, [0, 33, 7, 70, 15], [1, 1, 1, 1, 1], 8, 2, 64, torch.float32),
    (ForwardMode.DECODE, [54], [1], 4, 1, 96, torch.float16),
])
def test_backend_matches_torch_native(mode: ForwardMode, prefix_lens: list[int],
                                      extend_lens: list[int], heads: int, kv_heads: int,
                                      head_dim: int, dtype: torch.dtype) -> None:
    layer = RadixAttention(heads, head_dim, head_dim ** -0.5, kv_heads, layer_id=0)
    fb, kv, q, k, v = make_batch(mode, prefix_lens, extend_lens, heads, kv_heads, head_dim,
                                 dtype, seed=21)
    ref_k, ref_v = kv.kv_pool.k_buffer[0].clone(), kv.kv_pool.v_buffer[0].clone()
    triton_backend = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, max_context_len=128)
    out = run_backend(triton_backend, fb, layer, q, k, v)
    new_k, new_v = kv.kv_pool.k_buffer[0].clone(), kv.kv_pool.v_buffer[0].clone()

    kv.kv_pool.k_buffer[0].copy_(ref_k)
    kv.kv_pool.v_buffer[0].copy_(ref_v)
    ref = run_backend(TorchNativeAttnBackend(), fb, layer, q, k, v)
    assert torch.equal(new_k, kv.kv_pool.k_buffer[0]) and torch.equal(new_v, kv.kv_pool.v_buffer[0])
    assert rel_err(out, ref) < TOL[dtype]


def test_backend_graph_metadata_path() -> None:
    """Capture then replay with another batch of the same size: the replayed metadata
    lives in the preallocated buffers and gives the same output as the eager path."""
    heads, kv_heads, head_dim = 8, 2, 64
    layer = RadixAttention(heads, head_dim, 0.125, kv_heads, layer_id=0)
    backend = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, max_context_len=128)
    backend.init_cuda_graph_state(max_bs=4)
    capture, *_ = make_batch(ForwardMode.DECODE, [3, 5, 1], [1, 1, 1], heads, kv_heads,
                             head_dim, torch.float32, seed=31)
    capture.attn_backend = backend
    backend.init_forward_metadata_capture_cuda_graph(capture)
    captured = capture.attn_metadata

    fb, kv, q, k, v = make_batch(ForwardMode.DECODE, [20, 0, 41], [1, 1, 1], heads, kv_heads,
                                 head_dim, torch.float32, seed=32)
    fb.attn_backend = backend
    backend.init_forward_metadata_replay_cuda_graph(fb)
    assert fb.attn_metadata.mid_o.data_ptr() == captured.mid_o.data_ptr()
    assert fb.attn_metadata.seq_lens.data_ptr() == captured.seq_lens.data_ptr()
    assert fb.attn_metadata.mid_o.shape == captured.mid_o.shape
    md = fb.attn_metadata
    eager = run_backend(TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 128), fb, layer,
                        q, k, v)
    fb.attn_backend, fb.attn_metadata = backend, md
    replayed = layer(q, k, v, fb, save_kv_cache=False)  # the eager run stored k, v
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
