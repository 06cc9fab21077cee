"""Fused MoE kernel vs the naive per-expert loop, Qwen3-30B-A3B's expert shapes.

    python tests/gpu/bench_moe.py            # table at 1 / 64 / 256 tokens (and more)
    python tests/gpu/bench_moe.py --tune     # sweep block sizes, print TUNED entries

128 experts, hidden 2048, moe_intermediate 768, top-8, bf16, one layer. Few tokens are
bound by reading the experts' weights: the figure is the bytes of the experts actually
routed to over the time, as a fraction of the measured copy bandwidth. Many tokens are
compute-bound: TFLOP/s of the 3 projections of T*k (token, expert) pairs. Every timed
configuration is first checked against the reference; times are medians of
triton.testing.do_bench (L2 flushed before each call).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.moe import fused_experts_reference  # noqa: E402
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton  # noqa: E402
from radixserve.layers.moe.tuned_configs import MoEKernelConfig, get_moe_config  # noqa: E402

DEV = torch.device("cuda")
E, H, I, K, DTYPE = 128, 2048, 768, 8, torch.bfloat16


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(2**31, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def inputs(tokens: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=DEV, dtype=DTYPE) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g, device=DEV, dtype=DTYPE) * I ** -0.5
    x = torch.randn(tokens, H, generator=g, device=DEV, dtype=DTYPE)
    # Softmax routing of random logits: roughly uniform load, as a trained router aims for.
    logits = torch.randn(tokens, E, generator=g, device=DEV)
    weights, ids = torch.topk(torch.softmax(logits, -1), K)
    return x, w13, w2, weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    if err > 2e-2:
        raise AssertionError(f"{what}: relative error {err:.3g}")


def bench_table(token_counts: list[int]) -> None:
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(DEV)}, copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"E={E} H={H} I={I} top-{K} {str(DTYPE).removeprefix('torch.')}")
    cols = ["tokens", "experts_hit", "fused_ms", "naive_ms", "speedup", "fused_frac_of_bw",
            "fused_tflops", "config"]
    print(" | ".join(cols))
    for tokens in token_counts:
        x, w13, w2, w, ids = inputs(tokens)
        ref = fused_experts_reference(x, w13, w2, w, ids)
        check(fused_experts_triton(x, w13, w2, w, ids), ref, f"{tokens} tokens")
        fused = median_ms(lambda: fused_experts_triton(x, w13, w2, w, ids))
        naive = median_ms(lambda: fused_experts_reference(x, w13, w2, w, ids))
        hit = int(torch.unique(ids).numel())
        weight_bytes = hit * 3 * H * I * w13.element_size()
        flops = 2 * tokens * K * 3 * H * I
        cfg = get_moe_config(E, I, H, K, tokens, DTYPE, DEV)
        row = [tokens, hit, f"{fused:.3f}", f"{naive:.3f}", f"{naive / fused:.1f}x",
               f"{weight_bytes / (fused * 1e-3) / bw:.2f}", f"{flops / (fused * 1e-3) / 1e12:.1f}",
               f"{cfg.block_m}/{cfg.block_n}/{cfg.block_k}/g{cfg.group_m}/w{cfg.num_warps}"
               f"/s{cfg.num_stages}"]
        print(" | ".join(str(c) for c in row), flush=True)


def candidates(tokens: int) -> list[MoEKernelConfig]:
    per_expert = tokens * K / E
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * per_expert)]
    out = []
    for bm, bn, bk, stages in itertools.product(block_ms, (64, 128), (64, 128), (3, 4)):
        warps = 4 if bm * bn <= 64 * 64 else 8
        out.append(MoEKernelConfig(bm, bn, bk, 1 if tokens <= 64 else 8, warps, stages))
    return out


def tune(token_counts: list[int]) -> None:
    best: dict[int, tuple[float, MoEKernelConfig]] = {}
    for tokens in token_counts:
        x, w13, w2, w, ids = inputs(tokens)
        ref = fused_experts_reference(x, w13, w2, w, ids)
        for cfg in candidates(tokens):
            try:
                check(fused_experts_triton(x, w13, w2, w, ids, cfg), ref, str(cfg))
                ms = median_ms(lambda: fused_experts_triton(x, w13, w2, w, ids, cfg))
            except triton.runtime.errors.OutOfResources:
                continue
            if tokens not in best or ms < best[tokens][0]:
                best[tokens] = (ms, cfg)
        print(f"{tokens} tokens: {best[tokens][0]:.3f} ms with {best[tokens][1]}", flush=True)
    print(f'\n("{torch.cuda.get_device_name(DEV)}", "bfloat16", {E}, {I}, {H}, {K}): {{')
    for i, tokens in enumerate(token_counts):
        bound = "1 << 62" if i == len(token_counts) - 1 else str(tokens)
        c = best[tokens][1]
        print(f"    {bound}: MoEKernelConfig({c.block_m}, {c.block_n}, {c.block_k}, "
              f"{c.group_m}, {c.num_warps}, {c.num_stages}),")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    args = parser.parse_args()
    if args.tune:
        tune(args.tokens or [1, 16, 64, 256, 1024, 4096])
    else:
        bench_table(args.tokens or [1, 64, 256, 1024, 4096])


if __name__ == "__main__":
    main()
