"""Multi-turn benchmark through the real scheduler (the Engine): N clients x R rounds,
each round appending a user turn to the client's history, as SGLang's
bench_multiturn.py does. It measures what HiCache is for: histories that outgrow the
device KV pool and come back.

    # the radix cache alone, GPU KV limited to about a quarter of the working set
    python -m radixserve.bench.multi_turn --model-path ../shared/model_configs/qwen3-8b \\
        --load-format dummy --skip-tokenizer-init --num-clients 80 --num-rounds 10 \\
        --request-length 2048 --output-length 64 --max-total-tokens 400000
    # the same with the host tier
    python -m radixserve.bench.multi_turn ... --enable-hierarchical-cache --hicache-ratio 4

Every client sends its next round as soon as the last one finished. Reports output
tokens/s, TTFT p50/p99, the cache hit rate (cached prompt tokens / prompt tokens) next
to the optimum the workload allows (every token computed once), and HiCache's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from radixserve.engine import Engine
from radixserve.server_args import ServerArgs


async def _client(engine: Engine, rng: random.Random, rounds: int, turn_len: int,
                  output_len: int, vocab: int, record: list[dict[str, float]]) -> None:
    history: list[int] = []
    sp = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    for _ in range(rounds):
        prompt = history + [rng.randrange(10, vocab) for _ in range(turn_len)]
        start = time.perf_counter()
        ttft, output, cached = None, [], 0
        async for chunk in await engine.async_generate(input_ids=prompt, sampling_params=sp,
                                                       stream=True):
            if ttft is None and chunk["output_ids"]:
                ttft = time.perf_counter() - start
            output += chunk["output_ids"]
            cached = chunk["meta_info"].get("cached_tokens", cached)
        # Each round can reuse the whole history except the last sampled token, whose
        # KV was never computed.
        reusable = max(len(history) - 1, 0)
        record.append({"ttft": ttft or 0.0, "latency": time.perf_counter() - start,
                       "prompt": len(prompt), "cached": cached, "reusable": reusable,
                       "output": len(output)})
        history = prompt + output


async def _run(engine: Engine, args: argparse.Namespace, vocab: int) -> list[dict[str, float]]:
    record: list[dict[str, float]] = []
    await asyncio.gather(*[
        _client(engine, random.Random(args.seed * 1000 + c), args.num_rounds,
                args.request_length, args.output_length, vocab, record)
        for c in range(args.num_clients)])
    return record


def summarize(record: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    ttft = np.array([r["ttft"] for r in record])
    prompt = sum(r["prompt"] for r in record)
    return {
        "requests": len(record), "wall_s": wall_s,
        "output_throughput": sum(r["output"] for r in record) / wall_s,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "cache_hit_rate": sum(r["cached"] for r in record) / prompt,
        "optimal_hit_rate": sum(r["reusable"] for r in record) / prompt,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--num-rounds", type=int, default=4)
    parser.add_argument("--request-length", type=int, default=512,
                        help="tokens of each new user turn")
    parser.add_argument("--output-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-file", default=None, help="append the report as JSON")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    sa = ServerArgs.from_cli_args(args, parser)
    engine = Engine(**{f.name: getattr(sa, f.name) for f in fields(sa)})
    vocab = engine.model_config.vocab_size
    start = time.perf_counter()
    record = asyncio.run(_run(engine, args, vocab))
    report = summarize(record, time.perf_counter() - start)
    cache = getattr(engine.scheduler, "kv", None)
    stats = getattr(getattr(cache, "tree_cache", None), "stats", None)
    if stats is not None:
        report["hicache"] = asdict(stats)
    report["config"] = {k: getattr(args, k) for k in ("num_clients", "num_rounds",
                                                       "request_length", "output_length")}
    report["config"].update(enable_hierarchical_cache=sa.enable_hierarchical_cache,
                            max_total_tokens=sa.max_total_tokens)
    engine.shutdown()
    print(json.dumps(report, indent=2))
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(report) + "\n")
    return report


if __name__ == "__main__":
    main()
