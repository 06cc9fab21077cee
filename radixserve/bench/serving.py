"""Online serving benchmark: replay a dataset against a live server, measure latency.

    python -m radixserve.bench.serving --port 30000 --dataset-name random \\
        --num-prompts 200 --random-input-len 512 --random-output-len 128 --request-rate 8

Datasets: `random` (random token ids, lengths drawn from [len * ratio, len]),
`sharegpt` (a ShareGPT-format JSON file: first human turn as prompt, the reply's
length as output length) and `generated-shared-prefix` (groups of prompts sharing a
long system prompt: measures the radix cache). Requests arrive as a Poisson process
(--request-rate, inf = all at once), at most --max-concurrency at a time. Token
counts come from the server's own usage numbers, so they are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx2
import numpy as np


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# --- datasets ----------------------------------------------------------------------

def _random_text(tokenizer: Any, rng: random.Random, length: int) -> str:
    special = set(getattr(tokenizer, "all_special_ids", []))
    vocab = len(tokenizer)
    ids = []
    while len(ids) < length:
        token = rng.randrange(vocab)
        if token not in special:
            ids.append(token)
    return tokenizer.decode(ids)


def random_dataset(tokenizer: Any, num: int, input_len: int, output_len: int,
                   range_ratio: float, rng: random.Random) -> list[BenchRequest]:
    reqs = []
    for _ in range(num):
        n_in = rng.randint(max(int(input_len * range_ratio), 1), input_len)
        n_out = rng.randint(max(int(output_len * range_ratio), 1), output_len)
        prompt = _random_text(tokenizer, rng, n_in)
        reqs.append(BenchRequest(prompt, len(tokenizer.encode(prompt)), n_out))
    return reqs


def sharegpt_dataset(tokenizer: Any, path: str, num: int, output_len: int | None,
                     rng: random.Random) -> list[BenchRequest]:
    with open(path, encoding="utf-8") as f:
        conversations = [c.get("conversations", c.get("conversation", [])) for c in json.load(f)]
    pairs = [(c[0]["value"], c[1]["value"]) for c in conversations if len(c) >= 2]
    rng.shuffle(pairs)
    reqs = []
    for prompt, reply in pairs:
        prompt_len = len(tokenizer.encode(prompt))
        n_out = output_len or len(tokenizer.encode(reply))
        # Skip degenerate pairs, as usual for this dataset.
        too_short = prompt_len < 4 or (output_len is None and n_out < 4)
        if too_short or prompt_len > 1024 or prompt_len + n_out > 2048:
            continue
        reqs.append(BenchRequest(prompt, prompt_len, n_out))
        if len(reqs) == num:
            break
    return reqs


def shared_prefix_dataset(tokenizer: Any, num_groups: int, per_group: int, system_len: int,
                          question_len: int, output_len: int,
                          rng: random.Random) -> list[BenchRequest]:
    reqs = []
    for _ in range(num_groups):
        system = _random_text(tokenizer, rng, system_len)
        for _ in range(per_group):
            prompt = f"{system}\n\n{_random_text(tokenizer, rng, question_len)}"
            reqs.append(BenchRequest(prompt, len(tokenizer.encode(prompt)), output_len))
    rng.shuffle(reqs)
    return reqs


# --- requests ----------------------------------------------------------------------

def _payload(backend: str, req: BenchRequest, model: str | None) -> tuple[str, dict[str, Any]]:
    if backend == "sglang":
        return "/generate", {"text": req.prompt, "stream": True, "sampling_params": {
            "max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True}}
    return "/v1/completions", {"model": model or "default", "prompt": req.prompt,
                               "max_tokens": req.output_len, "temperature": 0.0,
                               "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}


def _chunk_progress(backend: str, chunk: dict[str, Any]) -> tuple[bool, int | None, int | None]:
    """(has new text, completion tokens if known, prompt tokens if known)."""
    if backend == "sglang":
        meta = chunk.get("meta_info", {})
        return True, meta.get("completion_tokens"), meta.get("prompt_tokens")
    usage = chunk.get("usage")
    if usage:
        return False, usage["completion_tokens"], usage["prompt_tokens"]
    choices = chunk.get("choices") or [{}]
    return bool(choices[0].get("text")), None, None


async def send_request(client: httpx2.AsyncClient, backend: str, req: BenchRequest,
                       model: str | None) -> RequestResult:
    path, body = _payload(backend, req, model)
    result = RequestResult(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                has_text, n_out, n_in = _chunk_progress(backend, chunk)
                now = time.perf_counter()
                if has_text:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                result.output_len = n_out if n_out is not None else result.output_len
                result.prompt_len = n_in if n_in is not None else result.prompt_len
        result.latency = time.perf_counter() - start
        result.success = True
    except httpx2.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run_benchmark(base_url: str, backend: str, reqs: list[BenchRequest],
                        request_rate: float, max_concurrency: int | None, model: str | None,
                        api_key: str | None, seed: int) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency or len(reqs) or 1)
    rng = np.random.default_rng(seed)
    limits = httpx2.Limits(max_connections=max_concurrency or max(len(reqs), 1))

    async def one(req: BenchRequest) -> RequestResult:
        async with limit:
            return await send_request(client, backend, req, model)

    async with httpx2.AsyncClient(base_url=base_url, headers=headers, timeout=None,
                                 limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(one(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# --- report ------------------------------------------------------------------------

def _stats(values: list[float], prefix: str) -> dict[str, float]:
    ms = np.asarray(values, dtype=np.float64) * 1000.0 if values else np.zeros(1)
    return {f"mean_{prefix}_ms": float(ms.mean()), f"median_{prefix}_ms": float(np.median(ms)),
            f"p99_{prefix}_ms": float(np.percentile(ms, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        **_stats([r.ttft for r in ok], "ttft"),
        **_stats([gap for r in ok for gap in r.itl], "itl"),
        **_stats(tpot, "tpot"),
        **_stats([r.latency for r in ok], "e2e_latency"),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key:<40}{value:>20.2f}")
        elif not isinstance(value, (dict, list)):
            print(f"{key:<40}{value!s:>20}")
    print("=" * 60)


# --- CLI ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["sglang", "openai"], default="sglang")
    p.add_argument("--base-url", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name sent to the OpenAI API")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path (default: the server's model, from /get_model_info)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt", "generated-shared-prefix"],
                   default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=512)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--gsp-num-groups", type=int, default=4)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=1024)
    p.add_argument("--gsp-question-len", type=int, default=64)
    p.add_argument("--gsp-output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="append the report as one JSON line")
    return p


def load_tokenizer(path: str) -> Any:
    from radixserve.model_loader.tokenizer import get_tokenizer
    from radixserve.server_args import ServerArgs

    return get_tokenizer(ServerArgs(model_path=path, device="cpu").load_config())


def build_dataset(args: argparse.Namespace, tokenizer: Any) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    if args.dataset_name == "random":
        return random_dataset(tokenizer, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio, rng)
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path (no downloads here)")
        return sharegpt_dataset(tokenizer, args.dataset_path, args.num_prompts,
                                args.sharegpt_output_len, rng)
    return shared_prefix_dataset(tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group,
                                 args.gsp_system_prompt_len, args.gsp_question_len,
                                 args.gsp_output_len, rng)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    tokenizer_path = args.tokenizer or httpx2.get(
        f"{base_url}/get_model_info", headers=headers, timeout=30).json()["tokenizer_path"]
    reqs = build_dataset(args, load_tokenizer(tokenizer_path))
    results, duration = asyncio.run(run_benchmark(
        base_url, args.backend, reqs, args.request_rate, args.max_concurrency, args.model,
        args.api_key, args.seed))
    report = {"backend": args.backend, "dataset_name": args.dataset_name,
              "num_prompts": len(reqs),
              # JSON has no infinity: "inf" means all requests at once.
              "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
              "max_concurrency": args.max_concurrency, **summarize(results, duration)}
    errors = [r.error for r in results if not r.success]
    if errors:
        report["errors"] = errors[:5]
    print_report(report)
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({**report, "requests": [asdict(r) for r in results]}) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["failed"] == 0 else 1)
