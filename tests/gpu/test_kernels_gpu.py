"""The Triton kernels and backend against their references on CUDA, at realistic sizes.

Run from the repository root: `python -m pytest tests/gpu/test_kernels_gpu.py` (the
helpers are shared with tests/test_triton_kernels.py, imported as `tests.…`).
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    # Skip before the kernel modules are imported: on CPU they must be decorated in
    # interpreter mode, which tests/test_triton_kernels.py arranges when it comes first.
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixserve.core.forward_batch import ForwardMode  # noqa: E402
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
from tests.test_triton_kernels import PagedKV, make_batch, randn, rel_err, run_backend  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
# fp32 runs exact fp32 dots; bf16 rounds p to bf16 before p @ V, like every flash kernel.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.bfloat16, torch.float32]


def lens(batch: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(batch)]


# (heads, kv_heads): GQA 4 (Llama-3-8B), GQA 7 (a group that is not a power of two), MHA.
SHAPES = [(32, 8), (28, 4), (16, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES)
@pytest.mark.parametrize("seq_lens", [[4133], [1, 777, 4099], lens(17, 1, 2500, seed=0)],
                         ids=["bs1", "bs3", "bs17"])
def test_decode_attention(seq_lens: list[int], heads: int, kv_heads: int,
                          dtype: torch.dtype) -> None:
    head_dim, batch = 128, len(seq_lens)
    kv = PagedKV(seq_lens, kv_heads, head_dim, dtype, seed=batch)
    q = randn(batch, heads, head_dim, dtype=dtype, seed=1)
    seq = torch.tensor(seq_lens, device=DEVICE)
    rows = kv.rows.to(DEVICE)
    splits = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 8192).splits_for(batch)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((batch, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    mid_o, mid_lse = alloc_decode_scratch(batch, heads, head_dim, splits, DEVICE)
    decode_attention_fwd(q, k_buf, v_buf, out, kv.req_to_token, rows, seq, head_dim ** -0.5,
                         mid_o, mid_lse)
    ref = decode_attention_reference(q, k_buf, v_buf, kv.req_to_token, rows, seq,
                                     head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES[:2])
@pytest.mark.parametrize("prefix_lens,extend_lens", [
    ([0], [4097]),
    ([0, 1000, 2500], [1300, 1, 517]),
    (lens(17, 0, 600, seed=1), lens(17, 1, 300, seed=2)),
], ids=["bs1", "bs3", "bs17"])
def test_extend_attention(prefix_lens: list[int], extend_lens: list[int], heads: int,
                          kv_heads: int, dtype: torch.dtype) -> None:
    head_dim, total = 128, sum(extend_lens)
    kv = PagedKV([max(p, 1) for p in prefix_lens], kv_heads, head_dim, dtype, seed=3)
    q = randn(total, heads, head_dim, dtype=dtype, seed=2)
    k = randn(total, kv_heads, head_dim, dtype=dtype, seed=3)
    v = randn(total, kv_heads, head_dim, dtype=dtype, seed=4)
    prefix = torch.tensor(prefix_lens, device=DEVICE)
    ext = torch.tensor(extend_lens, device=DEVICE)
    rows = kv.rows.to(DEVICE)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((total, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    extend_attention_fwd(q, k, v, out, k_buf, v_buf, kv.req_to_token, rows, prefix, ext,
                         torch.cumsum(ext, 0) - ext, max(extend_lens), head_dim ** -0.5)
    ref = extend_attention_reference(q, k, v, k_buf, v_buf, kv.req_to_token, rows, prefix, ext,
                                     head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("in_dtype,dtype", [(torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16)])
def test_store_kv(in_dtype: torch.dtype, dtype: torch.dtype) -> None:
    k_buf = randn(5000, 8, 128, dtype=dtype, seed=5)
    v_buf = randn(5000, 8, 128, dtype=dtype, seed=6)
    loc = torch.randperm(4999, generator=torch.Generator().manual_seed(7))[:1031].to(DEVICE) + 1
    k = randn(1031, 8, 128, dtype=in_dtype, seed=8)
    v = randn(1031, 8, 128, dtype=in_dtype, seed=9)
    ref_k, ref_v = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, loc, k, v)
    store_kv_reference(ref_k, ref_v, loc, k, v)
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rotary_activation(dtype: torch.dtype) -> None:
    rows, hidden = 17, 4096
    x = randn(rows, hidden, dtype=dtype, seed=10)
    w = randn(hidden, dtype=dtype, seed=11)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6))
    residual = randn(rows, hidden, dtype=dtype, seed=12)
    ref_out, ref_res = fused_add_rmsnorm_reference(x, residual, w, 1e-6)
    out, res = fused_add_rmsnorm(x.clone(), residual.clone(), w, 1e-6)
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out)

    inter = 12288
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=13)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_reference(gate_up))

    heads, kv_heads, head_dim = 32, 8, 128
    inv_freq = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(8192, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)
    positions = torch.randint(0, 8192, (rows,), device=DEVICE)
    for is_neox in (True, False):
        qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=14)
        q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
        ref_q, ref_k = apply_rotary_reference(q, k, positions, cache, is_neox)
        apply_rotary_(q, k, positions, cache, is_neox)
        torch.testing.assert_close(q, ref_q)
        torch.testing.assert_close(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,prefix_lens,extend_lens", [
    (ForwardMode.EXTEND, [0, 700, 1500], [2049, 1, 333]),
    (ForwardMode.MIXED, [300, 0, 41], [1, 1000, 1]),
    (ForwardMode.DECODE, lens(17, 0, 3000, seed=3), [1] * 17),
], ids=["extend", "mixed", "decode"])
def test_backend_matches_torch_native(mode: ForwardMode, prefix_lens: list[int],
                                      extend_lens: list[int], dtype: torch.dtype) -> None:
    heads, kv_heads, head_dim = 32, 8, 128
    layer = RadixAttention(heads, head_dim, head_dim ** -0.5, kv_heads, layer_id=0)
    fb, kv, q, k, v = make_batch(mode, prefix_lens, extend_lens, heads, kv_heads, head_dim,
                                 dtype, seed=21)
    before_k, before_v = kv.kv_pool.k_buffer[0].clone(), kv.kv_pool.v_buffer[0].clone()
    out = run_backend(TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 8192), fb, layer,
                      q, k, v)
    new_k, new_v = kv.kv_pool.k_buffer[0].clone(), kv.kv_pool.v_buffer[0].clone()
    kv.kv_pool.k_buffer[0].copy_(before_k)
    kv.kv_pool.v_buffer[0].copy_(before_v)
    ref = run_backend(TorchNativeAttnBackend(), fb, layer, q, k, v)
    assert torch.equal(new_k, kv.kv_pool.k_buffer[0]) and torch.equal(new_v, kv.kv_pool.v_buffer[0])
    assert rel_err(out, ref) < TOL[dtype]


def test_cuda_graph_replay_matches_eager() -> None:
    """Capture a decode step with dummy lengths, replay it on the real batch."""
    heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    layer = RadixAttention(heads, head_dim, head_dim ** -0.5, kv_heads, layer_id=0)
    seq_lens = lens(12, 1, 4000, seed=4)
    fb, kv, q, k, v = make_batch(ForwardMode.DECODE, [n - 1 for n in seq_lens], [1] * 12, heads,
                                 kv_heads, head_dim, dtype, seed=41)
    eager = run_backend(TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 8192), fb, layer,
                        q, k, v)

    backend = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 8192)
    backend.init_cuda_graph_state(max_bs=16)
    real_seq_lens, real_rows = fb.seq_lens, fb.req_pool_indices
    fb.attn_backend = backend
    fb.seq_lens = torch.full_like(real_seq_lens, backend.get_cuda_graph_seq_len_fill_value())
    fb.req_pool_indices = torch.zeros_like(real_rows)
    backend.init_forward_metadata_capture_cuda_graph(fb)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph compiles the kernels
        layer(q, k, v, fb)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(q, k, v, fb)

    fb.seq_lens, fb.req_pool_indices = real_seq_lens, real_rows
    backend.init_forward_metadata_replay_cuda_graph(fb)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)


# --- cascade decode (requests sharing a cached prefix) ----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES)
def test_cascade_decode_attention(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    """Groups of 1 to 40 requests on prefixes of 1 to 3,001 tokens (groups larger than a
    tile), next to requests that share nothing, against the plain reference."""
    from radixserve.layers.attention.cascade import (
        KV_START, PERM, TILE_COUNT, TILE_START, plan_cascade)
    from radixserve.layers.attention.triton_ops.decode_attention import (
        CascadeInputs, cascade_tile_size)
    from tests.test_cascade_attention import SharedKV

    rng = random.Random(heads)
    groups = [(3001, lens(40, 1, 300, seed=1)), (0, [2049]), (1, [5, 700]),
              (517, lens(3, 1, 90, seed=2)), (0, [1]), (2048, lens(17, 1, 4, seed=3))]
    head_dim = 128
    kv = SharedKV(groups, kv_heads, head_dim, dtype, seed=rng.randrange(100))
    batch = len(kv.seq_lens)
    backend = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, 8192)
    plan = plan_cascade(kv.keys, kv.prefix_lens, cascade_tile_size(heads // kv_heads))
    rows_d = plan.packed.to(DEVICE)
    pre_splits = backend.prefix_splits_for(plan.num_tiles, plan.max_prefix)
    cascade = CascadeInputs(rows_d[PERM], rows_d[KV_START], rows_d[TILE_START, :plan.num_tiles],
                            rows_d[TILE_COUNT, :plan.num_tiles],
                            *alloc_decode_scratch(batch, heads, head_dim, pre_splits, DEVICE))
    q = randn(batch, heads, head_dim, dtype=dtype, seed=4)
    seq = torch.tensor(kv.seq_lens, device=DEVICE)
    rows = kv.rows.to(DEVICE)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((batch, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    mid = alloc_decode_scratch(batch, heads, head_dim, backend.splits_for(batch), DEVICE)
    decode_attention_fwd(q, k_buf, v_buf, out, kv.req_to_token, rows, seq, head_dim ** -0.5,
                         *mid, cascade=cascade)
    ref = decode_attention_reference(q, k_buf, v_buf, kv.req_to_token, rows, seq,
                                     head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


# --- grammar: greedy tokens under a bitmask -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,subset", [(1, False), (64, False), (64, True), (256, True)])
def test_masked_argmax_at_qwen3_vocab(batch: int, subset: bool, dtype: torch.dtype) -> None:
    """Qwen3's vocabulary, with masks like a 49,152-token tokenizer's grammar (the ids
    past it never allowed), against the reference and today's xgrammar path."""
    import xgrammar as xgr

    from radixserve.layers.triton_kernels.masked_argmax import (
        masked_argmax, masked_argmax_reference)

    vocab = 151936
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    logits = torch.randn(batch, vocab, device=DEVICE, generator=gen).to(dtype)
    logits[:, ::7] = logits[:, :1]  # ties with token 0
    words = torch.randint(-2**31, 2**31, (batch, (vocab + 31) // 32), device=DEVICE,
                          generator=gen, dtype=torch.int64)
    words[:, 49152 // 32:] = 0
    bitmask = words.to(torch.int32)
    rows = None
    if subset:
        rows = torch.randperm(batch, device=DEVICE, generator=gen)[:batch // 3].sort().values
        rows = rows.to(torch.int32)
    got = masked_argmax(logits, bitmask, rows)
    assert torch.equal(got, masked_argmax_reference(logits, bitmask, rows))
    processed = logits.to(torch.float32, copy=True)
    xgr.apply_token_bitmask_inplace(processed, bitmask, indices=rows)
    assert torch.equal(got, processed.argmax(dim=-1))
