"""The skinny GEMV against cuBLAS at the Qwen3 decode shapes, on one GPU.

    python tests/gpu/bench_gemv.py [--sweep]

Each shape is timed as decode runs it: a CUDA graph of launches over distinct weights
(about 1 GiB of them, so nothing is served from L2), divided by the launch count, so the
figure includes the gaps between kernels. Bandwidth counts the weight bytes (the floor
at these M) over the time, next to the measured copy bandwidth. Every variant is
checked against an fp32 reference before it is timed. Variants: F.linear with the
[N, K] weight (what the layers ran before), x @ W with W stored [K, N], the GEMV's
default config and, with --sweep, the best of a grid of configs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.layers.triton_kernels.gemv import (  # noqa: E402
    GemvConfig, default_config, gemv, gemv_reference)

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
# (name, K, N, uses per step): per layer, times the layer count; lm_head once.
MODELS = {
    "qwen3-8b": (36, [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 24576),
                      ("down", 12288, 4096), ("lm_head", 4096, 151936)]),
    # One rank's share at --tp-size 2: column-parallel N and row-parallel K halve.
    "qwen3-8b-tp2": (36, [("qkv", 4096, 3072), ("o", 2048, 4096), ("gate_up", 4096, 12288),
                          ("down", 6144, 4096), ("lm_head", 4096, 75968)]),
    "qwen3-0.6b": (28, [("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144),
                        ("down", 3072, 1024), ("lm_head", 1024, 151936)]),
}
SWEEP = [GemvConfig(bn, bk, 1, w, s) for bn, bk, w, s in [
    (16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3),
    (32, 256, 8, 4), (64, 128, 4, 4), (64, 256, 4, 4), (64, 256, 8, 3), (128, 128, 8, 4),
    (128, 256, 8, 3)]] + [GemvConfig(bn, bk, 1, w, s, use_dot=False) for bn, bk, w, s in [
        (16, 512, 4, 1), (16, 512, 4, 3), (32, 256, 4, 2), (64, 256, 8, 2), (8, 1024, 4, 2),
        (4, 1024, 4, 2), (4, 2048, 4, 2), (8, 1024, 4, 1), (8, 1024, 4, 3), (8, 2048, 4, 2),
        (8, 1024, 8, 2), (8, 2048, 8, 2), (16, 1024, 4, 2), (16, 1024, 8, 2), (8, 512, 2, 2)]]


def copy_bandwidth() -> float:
    # Half a second of matrix products first: an idle GPU's clocks ramp up slowly.
    a = torch.randn(8192, 8192, device=DEV, dtype=DTYPE)
    for _ in range(300):
        a @ a
    src = torch.empty(1 << 31, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    # Timed outside a graph: captured, the copy becomes a copy-engine node, which reached
    # only 2.4 TB/s on an H100 where the kernel copy reaches 3.0.
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() / (statistics.median(times) * 1e-3)


def graph_ms(fn: Callable[[int], object], launches: int, reps: int = 15) -> float:
    """Median time of one fn(i) when `launches` of them replay back to back in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(launches):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return math.inf
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Shape:
    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.nbytes = k * n * 2
        self.copies = max(2, min(256, (1 << 30) // self.nbytes))
        self.w = [torch.randn(n, k, device=DEV, dtype=DTYPE) / k ** 0.5
                  for _ in range(self.copies)]

    def transposed(self) -> list[torch.Tensor]:
        return [w.t().contiguous() for w in self.w]

    def tbps(self, fn: Callable[[int], object]) -> float:
        return self.nbytes / (graph_ms(fn, self.copies) * 1e-3) / 1e12

    def check(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], m: int) -> float:
        x = torch.randn(m, self.k, device=DEV, dtype=DTYPE)
        out = fn(x, self.w[1])
        return rel_err(out, gemv_reference(x, self.w[1]))


def bench_shape(shape: Shape, m: int, sweep: list[GemvConfig]) -> dict[str, tuple[float, str]]:
    """{variant: (TB/s, detail)} for one shape and row count."""
    x = torch.randn(m, shape.k, device=DEV, dtype=DTYPE)
    res: dict[str, tuple[float, str]] = {}
    res["F.linear[N,K]"] = (shape.tbps(lambda i: F.linear(x, shape.w[i])), "")
    wt = shape.transposed()
    res["x@W[K,N]"] = (shape.tbps(lambda i: x @ wt[i]), "")
    del wt
    cfg = default_config(m, shape.n, shape.k)
    err = shape.check(lambda a, w: gemv(a, w, config=cfg), m)
    if err > 1e-2:
        raise AssertionError(f"default config {cfg} wrong at m={m} {shape.k}x{shape.n}: {err}")
    res["gemv default"] = (shape.tbps(lambda i: gemv(x, shape.w[i], config=cfg)), _short(cfg))
    best = (0.0, "")
    for base in sweep:
        if not base.use_dot and m != 1:
            continue
        for split in (1, 2, 4, 8):
            if shape.k // split < 2 * base.block_k:
                break
            c = GemvConfig(base.block_n, base.block_k, split, base.num_warps, base.num_stages,
                           base.use_dot)
            err = shape.check(lambda a, w: gemv(a, w, config=c), m)
            if err > 1e-2:
                raise AssertionError(f"{c} wrong at m={m} {shape.k}x{shape.n}: {err}")
            bw = shape.tbps(lambda i: gemv(x, shape.w[i], config=c))
            if bw > best[0]:
                best = (bw, _short(c))
    if sweep:
        res["gemv best"] = best
    return res


def _short(c: GemvConfig) -> str:
    kind = "dot" if c.use_dot else "fma"
    return f"{kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--fma-only", action="store_true", help="sweep the FMA kernel only")
    args = parser.parse_args()
    sweep = [c for c in SWEEP if not (args.fma_only and c.use_dot)] if args.sweep else []
    torch.manual_seed(0)
    copy = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.2f} TB/s")
    table = []
    for model in args.models:
        layers, shapes = MODELS[model]
        step_ms: dict[tuple[int, str], float] = {}
        for name, k, n in shapes:
            shape = Shape(k, n)
            uses = 1 if name == "lm_head" else layers
            for m in args.rows:
                res = bench_shape(shape, m, sweep)
                for variant, (bw, detail) in res.items():
                    table.append((model, name, f"{k}x{n}", m, variant, bw, bw / copy, detail))
                    step_ms[(m, variant)] = (step_ms.get((m, variant), 0.0)
                                             + uses * shape.nbytes / (bw * 1e12) * 1e3)
                print(model, name, m, {v: round(b, 3) for v, (b, _) in res.items()}, flush=True)
            del shape
            torch.cuda.empty_cache()
        for (m, variant), ms in step_ms.items():
            table.append((model, "STEP(all linears)", "", m, variant, ms, 0.0, "ms/step"))
    print("\nmodel | layer | KxN | M | variant | TB/s | of copy | config")
    for row in table:
        model, name, kn, m, variant, bw, frac, detail = row
        print(f"{model} | {name} | {kn} | {m} | {variant} | {bw:.3f} | {frac:.0%} | {detail}")


if __name__ == "__main__":
    main()
