"""Fused MoE kernel vs the naive per-expert loop, Qwen3-30B-A3B's expert shapes.

    python tests/gpu/bench_moe.py                # table at 1 / 64 / 256 tokens (and more)
    python tests/gpu/bench_moe.py --tune         # sweep block sizes, print the tuned table
    python tests/gpu/bench_moe.py --tune --write # ... and write it where the kernel reads it

128 experts, hidden 2048, moe_intermediate 768, top-8, bf16, one layer. Few tokens are
bound by reading the experts' weights: the figure is the bytes of the experts actually
routed to over the time, as a fraction of the measured copy bandwidth. Many tokens are
compute-bound: TFLOP/s of the 3 projections of T*k (token, expert) pairs. Every timed
configuration is first checked against the reference; times are medians of
triton.testing.do_bench (L2 flushed before each call).

--write [DIR] writes the tuned table as JSON (radixserve/layers/moe/tuned_configs.py
says the format) into DIR, by default radixserve/layers/moe/tuned/ where the kernel
reads it, replacing the file of this GPU and shape; it is rewritten after each token
count, so a run cut short still leaves the counts it finished.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.moe import fused_experts_reference  # noqa: E402
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton  # noqa: E402
from radixserve.layers.moe.tuned_configs import (MoEKernelConfig, format_tuned,  # noqa: E402
                                                 get_moe_config, tuned_file_name)

TUNED_DIR = Path(__file__).resolve().parents[2] / "radixserve" / "layers" / "moe" / "tuned"

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
    """The sweep, kept small enough that the six default token counts take about three
    minutes on an H100, Triton compiles included (88 runs of 40 distinct configs):
    BLOCK_M from a quarter of to twice the tokens per expert (16 at least: under that
    most of an M block is padding, far over it the tiles are too small), N and K tiles
    of 64 or 128, 3 or 4 stages. num_warps follows the tile area and group_m is 1 while
    each expert has at most one M block, 8 after; neither is swept."""
    per_expert = tokens * K / E
    block_ms = [m for m in (16, 32, 64, 128) if per_expert / 4 <= m <= max(16, 2 * per_expert)]
    out = []
    for bm, bn, bk, stages in itertools.product(block_ms, (64, 128), (64, 128), (3, 4)):
        warps = 4 if bm * bn <= 64 * 64 else 8
        out.append(MoEKernelConfig(bm, bn, bk, 1 if tokens <= 64 else 8, warps, stages))
    return out


def time_config(x, w13, w2, w, ids, ref, cfg: MoEKernelConfig) -> float | None:
    """Median ms of a config that gives the reference's result; None if it does not fit."""
    try:
        check(fused_experts_triton(x, w13, w2, w, ids, cfg), ref, str(cfg))
        return median_ms(lambda: fused_experts_triton(x, w13, w2, w, ids, cfg))
    except triton.runtime.errors.OutOfResources:
        return None


def tune(token_counts: list[int], write_dir: Path | None) -> None:
    key = (torch.cuda.get_device_name(DEV), str(DTYPE).removeprefix("torch."), E, I, H, K)
    start = time.perf_counter()
    best: dict[int, MoEKernelConfig] = {}
    extra: dict[int, dict[str, float | int]] = {}
    for i, tokens in enumerate(token_counts):
        x, w13, w2, w, ids = inputs(tokens)
        ref = fused_experts_reference(x, w13, w2, w, ids)
        before = time_config(x, w13, w2, w, ids, ref,
                             get_moe_config(E, I, H, K, tokens, DTYPE, DEV))
        timed = [(ms, cfg) for cfg in candidates(tokens)
                 if (ms := time_config(x, w13, w2, w, ids, ref, cfg)) is not None]
        ms, best[tokens] = min(timed, key=lambda t: t[0])
        extra[tokens] = {"tuned_at_tokens": tokens, "ms": round(ms, 4),
                         "ms_before": None if before is None else round(before, 4)}
        was = "does not fit" if before is None else f"{before:.3f} ms"
        print(f"{tokens} tokens: {ms:.3f} ms with {best[tokens]} (before: {was}; "
              f"{len(timed)} configs, {time.perf_counter() - start:.0f} s so far)", flush=True)
        text = _tuned_text(key, best, extra, token_counts[:i + 1])
        if write_dir is not None:
            write_dir.mkdir(parents=True, exist_ok=True)
            (write_dir / tuned_file_name(key)).write_text(text, encoding="utf-8")
    print(f"\n{text}", end="")
    if write_dir is not None:
        print(f"written to {write_dir / tuned_file_name(key)}")


def _tuned_text(key, best: dict[int, MoEKernelConfig], extra: dict, done: list[int]) -> str:
    """The table so far, by token count; the largest count stands for every larger
    batch."""
    last = max(best)
    best = {**best, 1 << 62: best[last]}
    extra = {**extra, 1 << 62: extra[last]}
    del best[last], extra[last]
    note = (f"tuned by tests/gpu/bench_moe.py --tune at {done} tokens, "
            f"{datetime.date.today().isoformat()}; ms: median of triton do_bench, "
            f"ms_before: the config used before")
    return format_tuned(key, best, note, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--write", type=Path, nargs="?", const=TUNED_DIR, default=None,
                        metavar="DIR", help=f"with --tune: write the table (default {TUNED_DIR})")
    args = parser.parse_args()
    if args.tune:
        tune(args.tokens or [1, 16, 64, 256, 1024, 4096], args.write)
    else:
        bench_table(args.tokens or [1, 64, 256, 1024, 4096])


if __name__ == "__main__":
    main()
