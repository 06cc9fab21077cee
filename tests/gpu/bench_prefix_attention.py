"""Attention kernels on the shared-prefix workload's shapes, one GPU.

    python tests/gpu/bench_prefix_attention.py

Qwen3-0.6B heads (16 query, 8 KV, head_dim 128, bf16). Two parts:

* extend: 64 requests x 128 new tokens, each on a cached 2,048-token prefix shared by
  16 of them (4 distinct prefixes) -- a prefill step of the cache-on run -- under a few
  tile configurations;
* decode: batch 512 over 2,300-token contexts: 32 groups sharing their 2,172-token
  prefix slots (the cache-on run), plainly and as a cascade (each group's prefix
  attended once for its 16 members), and every request on its own slots (the cache-off
  run); "unique KV" is the floor if each shared prefix were read once.

Timings are medians of triton.testing.do_bench. Times are per layer; the model has 28.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.attention.triton import TritonAttnBackend  # noqa: E402
from radixserve.layers.attention.cascade import (  # noqa: E402
    KV_START, PERM, TILE_COUNT, TILE_START, plan_cascade)
from radixserve.layers.attention.triton_ops.decode_attention import (  # noqa: E402
    CascadeInputs, alloc_decode_scratch, decode_attention_fwd)
from radixserve.layers.attention.triton_ops.extend_attention import (  # noqa: E402
    ExtendConfig, extend_attention_fwd)

HEADS, KV_HEADS, HEAD_DIM, DTYPE, DEV = 16, 8, 128, torch.bfloat16, "cuda"
KV_BYTES_PER_TOKEN = KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16, one layer


def bench_extend(batch: int = 64, ext: int = 128, prefix: int = 2048, groups: int = 4) -> None:
    slots = groups * prefix + batch * ext + 1
    pool_k = torch.randn(slots, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    pool_v = torch.randn_like(pool_k)
    req_to_token = torch.zeros(batch, prefix + ext, dtype=torch.int32, device=DEV)
    for b in range(batch):
        g = b % groups
        req_to_token[b, :prefix] = torch.arange(1 + g * prefix, 1 + (g + 1) * prefix)
        first = 1 + groups * prefix + b * ext
        req_to_token[b, prefix:] = torch.arange(first, first + ext)
    q = torch.randn(batch * ext, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    k = torch.randn(batch * ext, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    rows = torch.arange(batch, device=DEV)
    prefix_lens = torch.full((batch,), prefix, device=DEV)
    ext_lens = torch.full((batch,), ext, device=DEV)
    starts = torch.arange(batch, device=DEV) * ext
    flops = 4 * batch * ext * (prefix + ext / 2) * HEAD_DIM * HEADS
    print(f"\nextend: {batch} x {ext} new tokens on {prefix}-token prefixes ({groups} distinct)")
    print("config | us | TFLOP/s")
    for cfg in (None, ExtendConfig(128, 128, 8, 3), ExtendConfig(128, 64, 4, 3),
                ExtendConfig(64, 64, 4, 3), ExtendConfig(64, 32, 4, 3),
                ExtendConfig(128, 32, 4, 4)):
        ms = triton.testing.do_bench(lambda: extend_attention_fwd(
            q, k, v, out, pool_k, pool_v, req_to_token, rows, prefix_lens, ext_lens, starts,
            ext, HEAD_DIM ** -0.5, cfg))
        print(f"{cfg or 'default'} | {ms * 1e3:.0f} | {flops / ms / 1e9:.0f}")


def bench_decode(batch: int = 512, ctx: int = 2300, shared_len: int = 2172,
                 groups: int = 32) -> None:
    print(f"\ndecode: batch {batch}, context {ctx}")
    print("slots | us | unique KV MB | us at copy bandwidth")
    bandwidth = _copy_bandwidth()
    for mode in ("shared prefixes", "cascade", "own slots"):
        shared = mode != "own slots"
        own = ctx - shared_len
        unique = groups * shared_len + batch * own if shared else batch * ctx
        pool_k = torch.randn(unique + 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        pool_v = torch.randn_like(pool_k)
        req_to_token = torch.zeros(batch, ctx, dtype=torch.int32, device=DEV)
        for b in range(batch):
            if shared:
                g = b % groups
                req_to_token[b, :shared_len] = torch.arange(1 + g * shared_len,
                                                            1 + (g + 1) * shared_len)
                first = 1 + groups * shared_len + b * own
                req_to_token[b, shared_len:] = torch.arange(first, first + own)
            else:
                req_to_token[b] = torch.arange(1 + b * ctx, 1 + (b + 1) * ctx)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        out = torch.empty_like(q)
        backend = TritonAttnBackend(HEADS, KV_HEADS, HEAD_DIM, DEV, 40960)
        mid_o, mid_lse = alloc_decode_scratch(batch, HEADS, HEAD_DIM, backend.splits_for(batch),
                                              DEV)
        seq_lens = torch.full((batch,), ctx, device=DEV)
        rows = torch.arange(batch, device=DEV)
        cascade = None
        if mode == "cascade":
            plan = plan_cascade([b % groups for b in range(batch)], [shared_len] * batch,
                                backend.cascade_tile_size)
            packed = plan.packed.to(DEV)
            splits = backend.prefix_splits_for(plan.num_tiles, plan.max_prefix)
            cascade = CascadeInputs(packed[PERM], packed[KV_START],
                                    packed[TILE_START, :plan.num_tiles],
                                    packed[TILE_COUNT, :plan.num_tiles],
                                    *alloc_decode_scratch(batch, HEADS, HEAD_DIM, splits, DEV))

        def run() -> None:
            decode_attention_fwd(q, pool_k, pool_v, out, req_to_token, rows, seq_lens,
                                 HEAD_DIM ** -0.5, mid_o, mid_lse, cascade=cascade)

        ms = triton.testing.do_bench(run)
        unique_bytes = unique * KV_BYTES_PER_TOKEN
        floor_us = unique_bytes / bandwidth * 1e6
        print(f"{mode} | {ms * 1e3:.0f} | {unique_bytes / 1e6:.0f} | {floor_us:.0f}")


def _copy_bandwidth() -> float:
    """Bytes per second a device copy moves (read + write), from a 2 GiB copy."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=DEV)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    bench_extend()
    bench_decode()
