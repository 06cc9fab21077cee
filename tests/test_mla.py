"""Multi-head latent attention: the compressed KV pool, the Triton MLA kernels and
backend (CPU interpreter, or compiled on CUDA) against the PyTorch reference, and the
engine's radix cache and chunked prefill on a DeepSeek checkpoint."""

from __future__ import annotations

import pytest
import torch

from radixserve.core.forward_batch import ForwardBatch, ForwardMode
from radixserve.engine import Engine
from radixserve.layers.attention.torch_native_mla import (TorchNativeMLABackend,
                                                          mla_decode_reference)
from radixserve.layers.attention.triton_mla import TritonMLABackend
from radixserve.layers.attention.triton_ops.decode_attention import alloc_decode_scratch
from radixserve.layers.attention.triton_ops.mla_decode import mla_decode_fwd
from radixserve.layers.radix_attention import RadixAttention
from radixserve.mem_cache.memory_pool import (MHATokenToKVPool, MLATokenToKVPool,
                                              ReqToTokenPool)
from tests.moe_factory import make_tiny_moe_checkpoint, one_thread  # noqa: F401
from tests.test_engine import hf_greedy

RANK, ROPE, HEADS, NOPE, V = 48, 8, 20, 16, 12  # rank not a power of 2; 2 head blocks
# On a CUDA machine the same tests run the compiled kernels.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def paged_cache(seq_lens: list[int], rank: int, rope: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0
                ) -> tuple[MLATokenToKVPool, ReqToTokenPool, torch.Tensor]:
    """A pool of random rows; each request's slots scattered over it (paging).
    Returns the pool, the request table and the requests' rows in it."""
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens) + 8
    pool = MLATokenToKVPool(total, dtype, rank, rope, 1, device)
    pool.kv_buffer[0].copy_(torch.randn(pool.kv_buffer[0].shape, generator=g))
    req_pool = ReqToTokenPool(len(seq_lens) + 1, max(seq_lens) + 4, device)
    perm = torch.randperm(total, generator=g)[:sum(seq_lens)] + 1
    start = 0
    for row, n in enumerate(seq_lens):
        req_pool.write(row + 1, 0, perm[start:start + n].to(device))  # row 0 left unused
        start += n
    return pool, req_pool, torch.arange(1, len(seq_lens) + 1, device=device)


def run_mla_decode_kernel(seq_lens: list[int], heads: int, rank: int, rope: int,
                          dtype: torch.dtype, device: torch.device, max_splits: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, reference output) for random queries over a random paged cache."""
    pool, req_pool, rows = paged_cache(seq_lens, rank, rope, dtype, device)
    g = torch.Generator().manual_seed(1)
    q_lat = torch.randn(len(seq_lens), heads, rank, generator=g).to(device, dtype)
    q_rope = torch.randn(len(seq_lens), heads, rope, generator=g).to(device, dtype)
    lens = torch.tensor(seq_lens, device=device)
    mid_o, mid_lse = alloc_decode_scratch(len(seq_lens), heads, rank, max_splits, device)
    out = torch.empty_like(q_lat)
    scale = (rank + rope) ** -0.5
    mla_decode_fwd(q_lat, q_rope, pool.kv_buffer[0], out, req_pool.req_to_token, rows, lens,
                   scale, mid_o, mid_lse)
    ref = mla_decode_reference(q_lat, q_rope, pool.kv_buffer[0], req_pool.req_to_token, rows,
                               lens, scale)
    return out, ref


def test_mla_decode_kernel_matches_reference() -> None:
    # Lengths cross 8-token blocks and 16-token splits on the CPU.
    out, ref = run_mla_decode_kernel([1, 17, 40], HEADS, RANK, ROPE, torch.float32, DEVICE, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _batch(mode: ForwardMode, pool: MLATokenToKVPool, req_pool: ReqToTokenPool,
           rows: torch.Tensor, prefix: list[int], ext: list[int], backend) -> ForwardBatch:
    seq = [p + e for p, e in zip(prefix, ext)]
    dev = rows.device
    loc = torch.cat([req_pool.req_to_token[r, p:s].long() for r, p, s in
                     zip(rows.tolist(), prefix, seq)])
    extend = {} if mode.is_decode() else dict(
        extend_prefix_lens=torch.tensor(prefix, device=dev),
        extend_seq_lens=torch.tensor(ext, device=dev),
        extend_start_loc=torch.tensor([0, *torch.tensor(ext).cumsum(0)[:-1].tolist()],
                                      device=dev),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=ext)
    fb = ForwardBatch(forward_mode=mode, batch_size=len(seq),
                      input_ids=torch.zeros(sum(ext), dtype=torch.int64, device=dev),
                      positions=torch.zeros(sum(ext), dtype=torch.int64, device=dev),
                      req_pool_indices=rows, seq_lens=torch.tensor(seq, device=dev),
                      out_cache_loc=loc, seq_lens_cpu=seq, req_to_token_pool=req_pool,
                      token_to_kv_pool=pool, attn_backend=backend, **extend)
    backend.init_forward_metadata(fb)
    return fb


def run_mla_backends(prefix: list[int], ext: list[int], heads: int, nope: int, rope: int,
                     v_dim: int, rank: int, dtype: torch.dtype, device: torch.device
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For the torch and the Triton MLA backend: (extend output, the rows the extend
    stored, the output of one decode step after it), on identical inputs."""
    g = torch.Generator().manual_seed(2)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    w_kv = rand(heads * (nope + v_dim), rank, scale=rank ** -0.5)
    layer = RadixAttention(heads, nope + rope, (nope + rope) ** -0.5, heads, 0,
                           v_head_dim=v_dim)

    def expand(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows.shape[0]
        kv = (rows[:, :rank] @ w_kv.T).view(n, heads, nope + v_dim)
        k_rope = rows[:, None, rank:].expand(n, heads, rope)
        return torch.cat([kv[..., :nope], k_rope], -1), kv[..., nope:]

    tokens, batch = sum(ext), len(ext)
    q = rand(tokens, heads, nope + rope)
    latent, k_rope = rand(tokens, rank), rand(tokens, rope)
    q_lat, q_rope = rand(batch, heads, rank), rand(batch, heads, rope)
    outs = []
    for backend in (TorchNativeMLABackend(),
                    TritonMLABackend(heads, rank, rope, device, max_context_len=8192)):
        pool, req_pool, rows = paged_cache([p + e for p, e in zip(prefix, ext)], rank, rope,
                                           dtype, device)
        fb = _batch(ForwardMode.EXTEND, pool, req_pool, rows, prefix, ext, backend)
        extend_out = backend.forward_mla_extend(q, latent, k_rope, expand, layer, fb)
        stored = pool.kv_buffer[0][fb.out_cache_loc, 0].clone()
        dec_prefix = [p + e - 1 for p, e in zip(prefix, ext)]
        fb = _batch(ForwardMode.DECODE, pool, req_pool, rows, dec_prefix, [1] * batch, backend)
        decode_out = backend.forward_mla_decode(q_lat, q_rope, latent[:batch], k_rope[:batch],
                                                layer, fb)
        outs.append((extend_out, stored, decode_out))
    assert torch.equal(outs[0][1], torch.cat([latent, k_rope], -1))
    return outs


@pytest.mark.parametrize("prefix", [[0, 0, 0], [0, 9, 33]])
def test_triton_mla_backend_matches_torch(prefix: list[int]) -> None:
    """Extend with and without cached prefixes (expanded form) and decode (absorbed),
    both writing the new rows into the pool first."""
    (e_ref, s_ref, d_ref), (e_got, s_got, d_got) = run_mla_backends(
        prefix, [1, 8, 7], HEADS, NOPE, ROPE, V, RANK, torch.float32, DEVICE)
    assert torch.equal(s_got, s_ref)
    torch.testing.assert_close(e_got, e_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_got, d_ref, rtol=1e-5, atol=1e-5)


def test_mla_cache_is_a_ninth_of_mha_for_deepseek_v2_lite() -> None:
    """KV bytes per token (bf16) at DeepSeek-V2-Lite's shapes (shared/model_configs):
    27 layers of one latent row, 512 + 64, versus 16 heads of K (128 + 64) and V (128)."""
    mla = MLATokenToKVPool.bytes_per_token(torch.bfloat16, 512, 64, 27)
    mha = MHATokenToKVPool.bytes_per_token(torch.bfloat16, 16, 128 + 64, 27, v_head_dim=128)
    assert (mla, mha) == (31_104, 276_480)


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_moe_checkpoint("deepseek-v2", tmp_path_factory.mktemp("dsv2"),
                                    with_tokenizer=False)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_mla_radix_cache_and_chunked_prefill(deepseek_v2) -> None:
    """Prompts sharing a 20-token prefix, prefilled in chunks of 7, then again from the
    radix cache: the same greedy tokens as HF every time."""
    path, hf = deepseek_v2
    shared = list(range(100, 120))
    prompts = [shared + [7, 8, 9], shared + [300], shared[:11]]
    refs = [hf_greedy(hf, p, 12)[0] for p in prompts]
    engine = Engine(model_path=str(path), max_total_tokens=2048, chunked_prefill_size=7,
                    skip_tokenizer_init=True)
    try:
        sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        first = engine.generate(input_ids=prompts, sampling_params=sp)
        again = engine.generate(input_ids=prompts, sampling_params=sp)
    finally:
        engine.shutdown()
    assert [o["output_ids"] for o in first] == refs
    assert [o["output_ids"] for o in again] == refs
    assert all(o["meta_info"]["cached_tokens"] >= len(p) - 1 for o, p in zip(again, prompts))
