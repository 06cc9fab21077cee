"""MoE decode at its floor: the fused routing kernel vs select_experts, and the
small-batch expert kernels vs the grouped GEMM, one MoE layer.

    python tests/gpu/bench_moe_decode.py                        # Qwen3-30B-A3B, V2-Lite
    python tests/gpu/bench_moe_decode.py --model qwen3-30b-a3b --tp 1 2 4 8
    python tests/gpu/bench_moe_decode.py --eager                # without CUDA graphs
    python tests/gpu/bench_moe_decode.py --sweep-small          # + the best small-path tiles
    python tests/gpu/bench_moe_decode.py --device cpu --model tiny --tokens 1 3
                                            # the interpreter: checks the script only

Experts at T = 1, 2, 4, 8, 16 (--tokens): each path's time, and the bytes of the
experts that the batch routes to (distinct experts hit x 3 x H x I_rank x element
size, the floor of the step) over that time as a fraction of the measured copy
bandwidth. Routing at the same T and at prefill sizes (--routing-tokens), with the
model's router dtype and variant.

Every timed call is first checked against its reference (the routing with the tests'
assert_same_routing, the experts against fused_experts_reference). Times are medians
of triton.testing.do_bench (L2 flushed before each call) of a CUDA graph replay of the
call, as decode runs it; --eager times the plain call. On CPU (--device cpu) the
kernels run in Triton's interpreter and times are one wall-clock call, meaningless
except as a check that every path runs.

--sweep-small also times the small-batch kernels with every pair of gate/up and down
tile heights (the step widths follow from them as in default_small_config), 4 and 8
warps, and prints the fastest at each T next to the default's time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class MoEShape:
    experts: int
    hidden: int
    inter: int
    top_k: int
    routing: dict  # RoutingConfig's fields (built once radixserve is imported)
    bias: bool = False
    logits_dtype: torch.dtype = torch.bfloat16


MODELS = {
    "qwen3-30b-a3b": MoEShape(128, 2048, 768, 8, {"renormalize": True}),
    "deepseek-v2-lite": MoEShape(64, 2048, 1408, 6, {}, logits_dtype=torch.float32),
    "deepseek-v3": MoEShape(256, 7168, 2048, 8,
                            {"scoring": "sigmoid", "renormalize": True, "num_expert_group": 8,
                             "topk_group": 4, "group_score": "top2_sum",
                             "routed_scaling_factor": 2.5},
                            bias=True, logits_dtype=torch.float32),
    "tiny": MoEShape(8, 40, 24, 2, {"renormalize": True}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS),
                        default=["qwen3-30b-a3b", "deepseek-v2-lite"])
    parser.add_argument("--tp", type=int, nargs="+", default=[1],
                        help="tensor-parallel sizes: the intermediate size is split by each")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--routing-tokens", type=int, nargs="+", default=None,
                        help="token counts of the routing table (default: --tokens, 256, 4096)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="of x and the experts (default: bfloat16; float32 on CPU, where "
                             "the interpreter's bf16 tl.dot is wrong)")
    parser.add_argument("--eager", action="store_true", help="time without CUDA graphs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sweep-small", action="store_true",
                        help="also sweep the small-batch kernels' tile sizes")
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tokens + (args.routing_tokens or [])):
        parser.error("token counts must be >= 1")
    for model in args.model:
        if any(t < 1 or MODELS[model].inter % t for t in args.tp):
            parser.error(f"--tp: every size must divide {model}'s intermediate size "
                         f"{MODELS[model].inter}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu to check the script)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


class Timer:
    """Median ms of a call: do_bench over a CUDA graph replay (or the plain call) on a
    GPU; one wall-clock call on CPU."""

    def __init__(self, device: torch.device, eager: bool) -> None:
        self.device = device
        self.eager = eager or device.type != "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        fn()  # compile and warm up outside any graph
        if self.eager:
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """Bytes/s of a 2 GiB device-to-device copy (read + write); None on CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (Timer(device, eager=True)(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    return bw


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def router_inputs(shape: MoEShape, tokens: int, device: torch.device, seed: int = 0):
    g = _generator(device, seed)
    logits = (torch.randn(tokens, shape.experts, generator=g, device=device) * 2
              ).to(shape.logits_dtype)
    bias = (torch.randn(shape.experts, generator=g, device=device) * 0.3
            if shape.bias else None)
    return logits, bias


def expert_weights(shape: MoEShape, inter: int, dtype: torch.dtype, device: torch.device):
    g = _generator(device, 0)
    w13 = (torch.randn(shape.experts, 2 * inter, shape.hidden, generator=g, device=device)
           * shape.hidden ** -0.5).to(dtype)
    w2 = (torch.randn(shape.experts, shape.hidden, inter, generator=g, device=device)
          * inter ** -0.5).to(dtype)
    return w13, w2


def _frac(nbytes: int, ms: float, bw: float | None) -> str:
    return "n/a" if bw is None else f"{nbytes / (ms * 1e-3) / bw:.2f}"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_routing(name: str, shape: MoEShape, token_counts: list[int], device: torch.device,
                  timer: Timer) -> None:
    from radixserve.layers.moe import RoutingConfig, select_experts
    from radixserve.layers.moe.topk_triton import fused_select_experts
    from tests.test_triton_kernels_moe_routing import assert_same_routing

    cfg = RoutingConfig(top_k=shape.top_k, **shape.routing)
    print(f"\nrouting, {name}: E={shape.experts} {cfg}, logits "
          f"{str(shape.logits_dtype).removeprefix('torch.')}")
    print("tokens | fused_ms | select_experts_ms | speedup")
    for tokens in token_counts:
        logits, bias = router_inputs(shape, tokens, device)
        assert_same_routing(logits, cfg, bias, fused_select_experts(logits, cfg, bias))
        fused = timer(lambda: fused_select_experts(logits, cfg, bias))
        ref = timer(lambda: select_experts(logits, cfg, bias))
        print(f"{tokens} | {fused:.4f} | {ref:.4f} | {ref / fused:.1f}x", flush=True)


def small_candidates(hidden: int, inter: int, device: torch.device) -> list:
    """Every (gate/up rows, down rows, warps) with default_small_config's step widths."""
    import triton

    from radixserve.layers.moe.small_batch_moe import _STEP_ELEMS, SmallBatchConfig

    out = []
    for block_i in (1, 2, 4, 8, 16):
        for block_h in (2, 4, 8, 16, 32):
            for warps in (4, 8) if device.type == "cuda" else (1,):
                out.append(SmallBatchConfig(
                    block_i=block_i,
                    block_k=min(triton.next_power_of_2(hidden), _STEP_ELEMS // (2 * block_i)),
                    block_h=block_h,
                    block_di=min(triton.next_power_of_2(inter), _STEP_ELEMS // block_h),
                    num_warps=warps, num_stages=3 if device.type == "cuda" else 1))
    return out


def _config_str(c) -> str:
    return (f"i{c.block_i}/k{c.block_k}/h{c.block_h}/di{c.block_di}/w{c.num_warps}"
            f"/s{c.num_stages}")


def sweep_small(x, w13, w2, weights, ids, ref: torch.Tensor, default_ms: float,
                timer: Timer) -> str:
    """The fastest small-batch config that matches the reference, as a table cell."""
    from radixserve.layers.moe.small_batch_moe import small_batch_experts

    timed = []
    for cfg in small_candidates(x.shape[1], w2.shape[2], x.device):
        if _rel_err(small_batch_experts(x, w13, w2, weights, ids, cfg), ref) > 2e-2:
            raise AssertionError(f"small_batch_experts with {cfg}: wrong result")
        timed.append((timer(lambda: small_batch_experts(x, w13, w2, weights, ids, cfg)), cfg))
    ms, best = min(timed, key=lambda t: t[0])
    return f"{ms:.4f} ({default_ms / ms:.2f}x of default) {_config_str(best)}"


def bench_experts(name: str, shape: MoEShape, tp: int, token_counts: list[int],
                  dtype: torch.dtype, device: torch.device, timer: Timer,
                  bw: float | None, sweep: bool = False) -> None:
    from radixserve.layers.moe import RoutingConfig, fused_experts_reference, select_experts
    from radixserve.layers.moe.fused_moe import use_small_batch
    from radixserve.layers.moe.fused_moe_triton import fused_experts_triton
    from radixserve.layers.moe.small_batch_moe import default_small_config, small_batch_experts

    inter = shape.inter // tp
    w13, w2 = expert_weights(shape, inter, dtype, device)
    cfg = RoutingConfig(top_k=shape.top_k, **shape.routing)
    print(f"\nexperts, {name}: E={shape.experts} H={shape.hidden} I={shape.inter}/tp{tp}="
          f"{inter} top-{shape.top_k} {str(dtype).removeprefix('torch.')}"
          f"{'' if timer.eager else ', CUDA graphs'}")
    print("tokens | experts_hit | floor_ms | small_ms | grouped_ms | small_frac_of_bw | "
          "grouped_frac_of_bw | grouped/small | default_path | small_config"
          + (" | best_small_ms" if sweep else ""))
    for tokens in token_counts:
        logits, bias = router_inputs(shape, tokens, device, seed=tokens)
        weights, ids = select_experts(logits, cfg, bias)
        x = torch.randn(tokens, shape.hidden, generator=_generator(device, tokens),
                        device=device).to(dtype)
        ref = fused_experts_reference(x, w13, w2, weights, ids)
        for fn in (small_batch_experts, fused_experts_triton):
            err = _rel_err(fn(x, w13, w2, weights, ids), ref)
            if err > 2e-2:
                raise AssertionError(f"{fn.__name__} at {tokens} tokens: relative error "
                                     f"{err:.3g}")
        small = timer(lambda: small_batch_experts(x, w13, w2, weights, ids))
        grouped = timer(lambda: fused_experts_triton(x, w13, w2, weights, ids))
        hit = int(torch.unique(ids).numel())
        nbytes = hit * 3 * shape.hidden * inter * w13.element_size()
        floor = "n/a" if bw is None else f"{nbytes / bw * 1e3:.4f}"
        path = "small" if use_small_batch(tokens, shape.top_k, shape.experts) else "grouped"
        sc = default_small_config(tokens, shape.top_k, shape.hidden, inter, device)
        best = (" | " + sweep_small(x, w13, w2, weights, ids, ref, small, timer)) if sweep else ""
        print(f"{tokens} | {hit} | {floor} | {small:.4f} | {grouped:.4f} | "
              f"{_frac(nbytes, small, bw)} | {_frac(nbytes, grouped, bw)} | "
              f"{grouped / small:.2f}x | {path} | {_config_str(sc)}{best}", flush=True)
    del w13, w2


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Before the first kernel module is imported: Triton reads it at decoration.
        os.environ["TRITON_INTERPRET"] = "1"
    timer = Timer(device, args.eager)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(device, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU interpreter"
    print(f"{name}, copy bandwidth "
          f"{'n/a' if bw is None else f'{bw / 1e12:.2f} TB/s'}")
    routing_tokens = args.routing_tokens or sorted(set(args.tokens) | {256, 4096})
    for model in args.model:
        shape = MODELS[model]
        bench_routing(model, shape, routing_tokens, device, timer)
        for tp in args.tp:
            bench_experts(model, shape, tp, args.tokens, dtype, device, timer, bw,
                          args.sweep_small)


if __name__ == "__main__":
    main()
