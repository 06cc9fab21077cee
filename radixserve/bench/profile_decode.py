"""Where one decode step's time goes, on one GPU.

    python -m radixserve.bench.profile_decode --model-path .bench_models/qwen3-8b \
        --load-format dummy --batch-size 1 --input-len 128 [--tp-size 2]

Prints the top kernels of the model forward (eager, so every launch is visible, and the
CUDA graph replay, which includes the logits), the kernel time per category, and the
step split into its parts, each timed with CUDA events: graph replay, eager logits,
sampling, and the whole
`forward_batch_generation` on the host clock. What the kernels do not account for is
launch gaps and host work.

With --tp-size N every rank runs the same profile (the collectives must match) and rank
0 prints its own: its NCCL kernels' time includes any wait for the other ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from radixserve.bench.one_batch import _alloc, _make_reqs
from radixserve.configs.model_config import ModelConfig
from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.distributed.parallel_state import get_tp_group
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.server_args import ServerArgs

# First match wins; names are Triton kernel names or cuBLAS/ATen ones.
_CATEGORIES = [
    ("gemm", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|splitk|sm90", re.I)),
    ("attention", re.compile(r"decode|_fwd|store_kv|attn|attention", re.I)),
    ("norm", re.compile(r"rmsnorm|norm", re.I)),
    ("rope", re.compile(r"rotary|rope", re.I)),
    ("act", re.compile(r"silu", re.I)),
    ("sampling", re.compile(r"argmax|softmax|topk|sort|reduce", re.I)),
]


def category(kernel: str) -> str:
    return next((c for c, pat in _CATEGORIES if pat.search(kernel)), "other")


def kernel_times_us(fn: Callable[[], None], steps: int) -> dict[str, float]:
    """Device time per kernel name, averaged over `steps` calls of fn."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.time_range.elapsed_us() / steps
    return dict(totals)


def cuda_ms(fn: Callable[[], None], reps: int) -> float:
    """Median device time of fn over reps, with CUDA events around each call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prefilled(runner: ModelRunner, bs: int, input_len: int) -> list[Req]:
    """Requests after their prefill, each holding one sampled token."""
    runner.req_to_token_pool.clear()
    runner.token_to_kv_pool_allocator.clear()
    reqs = _make_reqs(bs, input_len, runner.model_config.vocab_size, seed=0)
    for r in reqs:
        r.req_pool_idx = runner.req_to_token_pool.alloc()
    locs = torch.cat([_alloc(runner, r, input_len) for r in reqs])
    res = runner.forward_batch_generation(ScheduleBatch(reqs, ForwardMode.EXTEND,
                                                        out_cache_loc=locs))
    for r, tok in zip(reqs, res.next_token_ids):
        r.kv_committed_len = len(r.fill_ids)
        r.output_ids.append(tok)
    return reqs


def decode_batch(runner: ModelRunner, reqs: list[Req]) -> ScheduleBatch:
    for r in reqs:
        r.fill_ids = r.all_ids
    locs = torch.cat([_alloc(runner, r, 1) for r in reqs])
    return ScheduleBatch(reqs, ForwardMode.DECODE, out_cache_loc=locs)


def print_kernels(title: str, times: dict[str, float], top: int) -> float:
    total = sum(times.values())
    print(f"\n{title}: {total / 1e3:.3f} ms of kernels, {len(times)} distinct")
    for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us:9.1f} us  {category(name):9s}  {name[:90]}")
    per_cat: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        per_cat[category(name)] += us
    ranked = sorted(per_cat.items(), key=lambda kv: -kv[1])
    print("  by category: " + ", ".join(f"{c} {us / 1e3:.3f} ms" for c, us in ranked))
    return total


@torch.inference_mode()
def profile_decode(runner: ModelRunner, bs: int, input_len: int, steps: int = 5,
                   top: int = 15) -> dict[str, float]:
    """Print the breakdown; returns the headline numbers in ms."""
    reqs = prefilled(runner, bs, input_len)
    batch = decode_batch(runner, reqs)
    fb = runner.build_forward_batch(batch)
    info = SamplingBatchInfo.from_reqs(reqs, runner.model_config.vocab_size, runner.device)
    model = runner.model

    def eager() -> None:
        runner.attn_backend.init_forward_metadata(fb)
        runner.tp_group.begin_forward()
        model(fb.input_ids, fb.positions, fb)

    runner.attn_backend.init_forward_metadata(fb)
    runner.tp_group.begin_forward()
    hidden = model(fb.input_ids, fb.positions, fb)
    logits = model.compute_logits(hidden)
    result = {"eager_kernels_ms": print_kernels(
        "model forward, eager", kernel_times_us(eager, steps), top) / 1e3}
    result["logits_sample_kernels_ms"] = print_kernels(
        "compute_logits + sampler", kernel_times_us(
            lambda: runner.sampler(model.compute_logits(hidden), info), steps), top) / 1e3
    result["logits_ms"] = cuda_ms(lambda: model.compute_logits(hidden), 20)
    result["sample_ms"] = cuda_ms(lambda: runner.sampler(logits, info), 20)
    if runner.cuda_graph_runner is not None:
        replay = lambda: runner.replay_decode_graph(batch)  # noqa: E731
        result["graph_kernels_ms"] = print_kernels(
            "model forward + logits, CUDA graph replay", kernel_times_us(replay, steps), top) / 1e3
        result["replay_ms"] = cuda_ms(replay, 50)
    walls = []
    for _ in range(30):
        batch = decode_batch(runner, reqs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = runner.forward_batch_generation(batch)
        walls.append((time.perf_counter() - t0) * 1e3)
        for r, tok in zip(reqs, res.next_token_ids):
            r.kv_committed_len += 1
            r.output_ids.append(tok)
    result["step_ms"] = statistics.median(walls)
    print("\nstep parts (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    args.skip_tokenizer_init = True
    sa = ServerArgs.from_cli_args(args)
    if sa.max_running_requests is None:
        sa.max_running_requests = args.batch_size
    if sa.cuda_graph_max_bs is None:
        sa.cuda_graph_max_bs = args.batch_size
    if sa.tp_size > 1:
        from radixserve.managers.launcher import run_on_tp_ranks

        run_on_tp_ranks(_profile, sa, args)
    else:
        _profile(sa, args)


def _profile(sa: ServerArgs, args: argparse.Namespace) -> None:
    """The profile on this rank; only TP rank 0's output is shown."""
    quiet = get_tp_group().rank != 0
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        runner = ModelRunner(sa.runner_config(), ModelConfig.from_load_config(sa.load_config()))
        print(f"model={sa.model_path} device={torch.cuda.get_device_name(runner.device)} "
              f"batch={args.batch_size} input_len={args.input_len} tp={sa.tp_size}")
        profile_decode(runner, args.batch_size, args.input_len, args.steps)


if __name__ == "__main__":
    main()
