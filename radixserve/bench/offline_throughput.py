"""Offline throughput through the real scheduler (the Engine), no HTTP.

    # offline-256: 256 requests, input and output lengths uniform in [100, 1024], seed 0
    python -m radixserve.bench.offline_throughput --model-path ../shared/model_configs/qwen3-0.6b \
        --load-format dummy --dataset random --num-prompts 256 --compare-hf
    # shared-prefix: 32 groups x 16 requests sharing a 2048-token system prompt
    python -m radixserve.bench.offline_throughput --model-path ... --dataset shared-prefix

Reports output tokens/s and wall time; for shared-prefix also the cache hit rate next to
the optimum the workload allows (each group's prefix computed once).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch

from radixserve.bench.hf_baseline import build_hf_model, free_device_memory
from radixserve.configs.model_config import ModelConfig
from radixserve.engine import Engine
from radixserve.server_args import ServerArgs


def random_workload(n: int, lo: int, hi: int, out_lo: int, out_hi: int, vocab: int,
                    seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(n):
        prompts.append([rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))])
        outs.append(rng.randint(out_lo, out_hi))
    return prompts, outs


def shared_prefix_workload(groups: int, per_group: int, system_len: int, question_len: int,
                           output_len: int, vocab: int, seed: int
                           ) -> tuple[list[list[int]], list[int], int]:
    """Requests interleaved across groups (the hard order for a cache); returns the
    prompts, output lengths and the fewest prompt tokens any cache must compute."""
    rng = random.Random(seed)
    systems = [[rng.randrange(10, vocab) for _ in range(system_len)] for _ in range(groups)]
    prompts = []
    for _ in range(per_group):
        for g in range(groups):
            prompts.append(systems[g] + [rng.randrange(10, vocab) for _ in range(question_len)])
    must_compute = groups * system_len + groups * per_group * question_len
    return prompts, [output_len] * len(prompts), must_compute


def run_engine(engine: Engine, prompts: list[list[int]], outs: list[int]) -> dict[str, Any]:
    params = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for o in outs]
    before = engine.get_server_info()
    t0 = time.perf_counter()
    results = engine.generate(input_ids=prompts, sampling_params=params)
    wall = time.perf_counter() - t0
    after = engine.get_server_info()
    out_tokens = sum(r["meta_info"]["completion_tokens"] for r in results)
    in_tokens = sum(len(p) for p in prompts)
    cached = sum(r["meta_info"]["cached_tokens"] for r in results)
    return dict(wall_s=wall, output_tokens=out_tokens, input_tokens=in_tokens,
                output_tok_s=out_tokens / wall, total_tok_s=(out_tokens + in_tokens) / wall,
                cached_tokens=cached, cache_hit_rate=cached / in_tokens,
                prefill_tokens_computed=after.total_prefill_tokens - before.total_prefill_tokens,
                retractions=after.num_retractions - before.num_retractions)


def hf_throughput(model_path: str, dtype: torch.dtype, device: str, prompts: list[list[int]],
                  outs: list[int], batch_size: int) -> dict[str, Any]:
    """HF transformers `generate` on the same requests, `batch_size` at a time, left-padded;
    each batch runs to its longest output (HF has no continuous batching)."""
    model = build_hf_model(model_path, dtype, device)
    useful = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk, lens = prompts[start:start + batch_size], outs[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=max(lens), min_new_tokens=max(lens), pad_token_id=0)
        useful += sum(lens)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    return dict(hf_wall_s=wall, hf_output_tok_s=useful / wall, hf_requests=len(prompts))


def _run_ours(kwargs: dict[str, Any], prompts: list[list[int]], outs: list[int],
              must_compute: int | None, compare_no_cache: bool) -> dict[str, Any]:
    engine = Engine(**kwargs)
    # Warm up on every prompt with a few output tokens: the prefill shapes and the full
    # decode batch compile their Triton kernels here, not inside the timed run (and the
    # --compare-no-cache run after it, in this process, finds them compiled too).
    run_engine(engine, prompts, [min(o, 4) for o in outs])
    engine.flush_cache()
    row = run_engine(engine, prompts, outs)
    row["overlap"] = getattr(engine.scheduler, "overlap", None)  # None: DP controller
    engine.shutdown()
    if must_compute is not None:
        optimum = 1 - must_compute / row["input_tokens"]
        row["optimal_hit_rate"] = optimum
        row["hit_rate_vs_optimum"] = row["cache_hit_rate"] / optimum
    if compare_no_cache:
        engine = Engine(**{**kwargs, "disable_radix_cache": True})
        off = run_engine(engine, prompts, outs)
        engine.shutdown()
        row["no_cache_output_tok_s"] = off["output_tok_s"]
        row["no_cache_wall_s"] = off["wall_s"]
        row["no_cache_prefill_tokens_computed"] = off["prefill_tokens_computed"]
        row["speedup_with_cache"] = off["wall_s"] / row["wall_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--output-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--system-len", type=int, default=2048)
    parser.add_argument("--question-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-hf", action="store_true")
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="run HF on only the first N requests (it is slow)")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--hf-only", action="store_true",
                        help="run only HF (in its own process, so neither holds the other's memory)")
    parser.add_argument("--compare-no-cache", action="store_true",
                        help="shared-prefix: also run with --disable-radix-cache")
    parser.add_argument("--result-file", default=None)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    args.skip_tokenizer_init = True
    sa = ServerArgs.from_cli_args(args)
    kwargs = vars(sa)
    vocab = ModelConfig.from_load_config(sa.load_config()).vocab_size
    must_compute = None
    if args.dataset == "random":
        prompts, outs = random_workload(args.num_prompts, *args.input_range,
                                        *args.output_range, vocab, args.seed)
    else:
        prompts, outs, must_compute = shared_prefix_workload(
            args.groups, args.per_group, args.system_len, args.question_len, args.output_len,
            vocab, args.seed)
    row: dict[str, Any] = {"dataset": args.dataset, "requests": len(prompts)}
    if not args.hf_only:
        row.update(_run_ours(kwargs, prompts, outs, must_compute, args.compare_no_cache))
        print(json.dumps(row), flush=True)  # ours stays on record if HF (slow) is cut short
    if args.compare_hf or args.hf_only:
        n = args.hf_num_prompts or len(prompts)
        free_device_memory(sa.device)  # our engines are shut down: HF gets the whole GPU
        row.update(hf_throughput(sa.model_path, sa.torch_dtype, sa.device, prompts[:n],
                                 outs[:n], args.hf_batch_size))
        if "output_tok_s" in row:
            row["speedup_vs_hf"] = row["output_tok_s"] / row["hf_output_tok_s"]
    row["device"] = torch.cuda.get_device_name() if sa.device == "cuda" else "cpu"
    row["model"] = sa.model_path
    print(json.dumps(row, indent=1))
    if args.result_file:
        with open(args.result_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
