"""Time the Triton attention kernels against the device's own ceilings, on one GPU.

    python tests/gpu/bench_kernels.py

Decode is memory-bound: its figure is the KV bytes it must read over the time, as a
fraction of the measured device copy bandwidth (read + write bytes of a 2 GiB copy).
Target at batch 64 x context 4096: >= 70%. Causal prefill is compute-bound: 2*S*S*D*H
useful FLOPs (QK^T and PV, half the square); target at 4096 x 4096, head_dim 128:
>= 300 TFLOP/s on an H100. Every timed configuration is first checked against a
reference; timings are medians of triton.testing.do_bench, which flushes L2 before
each call. The split sweep shows what the split heuristic leaves on the table.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.attention.triton import TritonAttnBackend  # noqa: E402
from radixserve.layers.attention.triton_ops.decode_attention import (  # noqa: E402
    DecodeConfig, alloc_decode_scratch, decode_attention_fwd, decode_attention_reference)
from radixserve.layers.attention.triton_ops.extend_attention import (  # noqa: E402
    ExtendConfig, extend_attention_fwd)

DEV = torch.device("cuda")
HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16  # Llama-3-8B / Qwen3-8B


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting read + write."""
    src = torch.randn(2**30, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DTYPE, device=DEV)
    b = torch.randn(8192, 8192, dtype=DTYPE, device=DEV)
    return 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class DecodeCase:
    """A decode batch over a pool whose tokens sit in shuffled (or contiguous) slots."""

    def __init__(self, batch: int, ctx: int, shuffled: bool = True) -> None:
        self.batch, self.ctx = batch, ctx
        tokens = batch * ctx
        self.k_buf = torch.randn(tokens + 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        self.v_buf = torch.randn(tokens + 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        slots = (torch.randperm(tokens, device=DEV) if shuffled
                 else torch.arange(tokens, device=DEV)) + 1
        self.req_to_token = slots.view(batch, ctx).to(torch.int32)
        self.rows = torch.randperm(batch, device=DEV)
        self.seq_lens = torch.full((batch,), ctx, device=DEV)
        self.q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        self.out = torch.empty_like(self.q)

    def default_splits(self) -> int:
        """What TritonAttnBackend picks for this batch size when serving up to 32k."""
        return TritonAttnBackend(HEADS, KV_HEADS, HEAD_DIM, DEV, 32768).splits_for(self.batch)

    def run(self, splits: int, config: DecodeConfig | None = None) -> float:
        mid_o, mid_lse = alloc_decode_scratch(self.batch, HEADS, HEAD_DIM, splits, DEV)
        scale = HEAD_DIM ** -0.5

        def fn() -> None:
            decode_attention_fwd(self.q, self.k_buf, self.v_buf, self.out, self.req_to_token,
                                 self.rows, self.seq_lens, scale, mid_o, mid_lse, config)

        self.out.fill_(float("nan"))
        fn()
        check = slice(0, min(self.batch, 4))  # the reference loops in Python: a few rows
        ref = decode_attention_reference(self.q[check], self.k_buf, self.v_buf, self.req_to_token,
                                         self.rows[check], self.seq_lens[check], scale)
        err = rel_err(self.out[check], ref)
        if not err < 1e-2:
            raise AssertionError(f"decode bs={self.batch} ctx={self.ctx} splits={splits}: "
                                 f"rel err {err}")
        return median_ms(fn)

    def kv_bytes(self) -> int:
        return self.batch * self.ctx * KV_HEADS * 2 * HEAD_DIM * self.k_buf.element_size()


def bench_decode(bandwidth: float) -> list[tuple]:
    rows = []
    cases = [(1, c) for c in (512, 2048, 8192, 32768)] + [(8, c) for c in (512, 2048, 8192, 32768)]
    cases += [(64, 4096), (256, 1024), (512, 512)]
    for batch, ctx in cases:
        case = DecodeCase(batch, ctx)
        default = case.default_splits()
        # Bounds past ctx / min_split_tokens would only launch empty programs.
        bounds = {s for s in (1, 2, 4, 8, 16, 32, 64) if s == 1 or s * 256 <= ctx}
        times = {s: case.run(s) for s in sorted(bounds | {default})}
        best = min(times, key=times.get)
        gbs = case.kv_bytes() / (times[default] * 1e-3) / 1e9
        rows.append((batch, ctx, default, times[default] * 1e3, gbs,
                     100 * gbs * 1e9 / bandwidth, best, times[best] * 1e3))
        del case
    return rows


def bench_decode_configs(bandwidth: float) -> list[tuple]:
    """The headline case under a few block shapes, shuffled and contiguous slots."""
    rows = []
    for shuffled in (True, False):
        case = DecodeCase(64, 4096, shuffled)
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    cfg = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages)
                    ms = case.run(case.default_splits(), cfg)
                    gbs = case.kv_bytes() / (ms * 1e-3) / 1e9
                    rows.append(("shuffled" if shuffled else "contiguous", block_n, warps, stages,
                                 ms * 1e3, 100 * gbs * 1e9 / bandwidth))
        del case
    return rows


def bench_prefill(peak: float, seq: int = 4096) -> list[tuple]:
    """Causal prefill of one seq-token request (no prefix), plus a seq/4-token chunk on a
    3*seq/4-token cached prefix; SDPA (FlashAttention in torch) on the first as a peer."""
    q = torch.randn(seq, HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    k = torch.randn(seq, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    v = torch.randn(seq, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    out = torch.empty_like(q)
    pool_k = torch.randn(seq + 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    pool_v = torch.randn(seq + 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    req_to_token = (torch.randperm(seq, device=DEV) + 1).to(torch.int32).view(1, seq)
    rows = torch.zeros(1, dtype=torch.int64, device=DEV)
    scale = HEAD_DIM ** -0.5
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=scale, enable_gqa=True)
    ref = sdpa()[0].transpose(0, 1)
    flops = 2 * seq * seq * HEAD_DIM * HEADS

    def extend(prefix: int, ext: int, cfg: ExtendConfig | None):
        lens = torch.tensor([ext], device=DEV)
        return lambda: extend_attention_fwd(
            q[:ext], k[:ext], v[:ext], out[:ext], pool_k, pool_v, req_to_token, rows,
            torch.tensor([prefix], device=DEV), lens, torch.zeros_like(lens), ext, scale, cfg)

    results = [("sdpa (peer)", "-", median_ms(sdpa))]
    configs = [None, ExtendConfig(128, 128, 8, 3), ExtendConfig(128, 64, 4, 3),
               ExtendConfig(128, 64, 8, 2), ExtendConfig(64, 64, 4, 3), ExtendConfig(128, 32, 8, 3)]
    for cfg in configs:
        fn = extend(0, seq, cfg)
        out.fill_(float("nan"))
        fn()
        err = rel_err(out, ref)
        if not err < 1e-2:
            raise AssertionError(f"prefill {cfg}: rel err {err}")
        results.append(("triton", cfg or "default", median_ms(fn)))
    table = [(name, str(cfg), ms * 1e3, flops / (ms * 1e-3) / 1e12,
              100 * flops / (ms * 1e-3) / 1e12 / peak) for name, cfg, ms in results]
    chunk, prefix = seq // 4, seq - seq // 4
    chunk_ms = median_ms(extend(prefix, chunk, None))
    chunk_flops = 2 * 2 * chunk * (prefix + chunk // 2) * HEAD_DIM * HEADS
    table.append((f"triton, {chunk} on {prefix} prefix", "default", chunk_ms * 1e3,
                  chunk_flops / (chunk_ms * 1e-3) / 1e12,
                  100 * chunk_flops / (chunk_ms * 1e-3) / 1e12 / peak))
    return table


def print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in row))


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    bandwidth, peak = copy_bandwidth(), matmul_tflops()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); "
          f"bf16 8192^3 matmul {peak:.0f} TFLOP/s")
    print_table(f"decode, H={HEADS} Hkv={KV_HEADS} D={HEAD_DIM} bf16, shuffled slots "
                "(target >= 70% at bs 64 x 4096)",
                ("batch", "ctx", "splits", "us", "KV GB/s", "% copy bw", "best splits", "best us"),
                bench_decode(bandwidth))
    print_table("decode bs 64 x 4096, block shapes", ("slots", "block_n", "warps", "stages", "us",
                                                       "% copy bw"),
                bench_decode_configs(bandwidth))
    print_table(f"causal prefill 4096, H={HEADS} Hkv={KV_HEADS} D={HEAD_DIM} bf16 "
                "(target >= 300 TFLOP/s)",
                ("kernel", "config", "us", "TFLOP/s", "% matmul peak"), bench_prefill(peak))


if __name__ == "__main__":
    main()
