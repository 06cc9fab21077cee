"""Host time xgrammar takes per decode step: accepting each row's token, and filling the
next bitmask, for bench_grammar.py's records schema at the model's vocabulary.

    python tests/gpu/bench_grammar_host.py [--tokenizer-path .bench_models/tok] \
        [--batch 64] [--steps 256] [--stream docs|random] [--threads 1 2 8 auto] [--split 8]

Every variant advances its own matchers through the same tokens, so all see the same
states. Streams: `docs` tokenizes a valid document per row (short tokens, mostly
structure); `random` takes a uniformly random allowed token each step, which is what a
dummy-weight model does (long free-text tags, tens of thousands of allowed tokens).
`batch_accept_token` is a static method: its `BatchGrammarMatcher(max_threads)` does not
matter. The "split" row accepts the rows on N Python threads (xgrammar drops the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.constrained.xgrammar_backend import XGrammarBackend  # noqa: E402
from tests.gpu.bench_grammar import records_schema  # noqa: E402

QWEN3_VOCAB = 151936


def document(rng: random.Random, row: int) -> str:
    record = lambda: {"tag": "".join(rng.choice("abcdefgh ijklmnop_XYZ")  # noqa: E731
                                     for _ in range(rng.randint(1, 12))),
                      "score": rng.randint(0, 999), "status": rng.choice(["ok", "error"]),
                      "ok": rng.random() < 0.5}
    return json.dumps({"id": row * 7919, "records": [record() for _ in range(300)]})


def random_allowed(bitmask: torch.Tensor, vocab: int, rng: random.Random) -> list[int]:
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)
    return [rng.choice(row.nonzero().flatten().tolist()) for row in bits[:, :vocab]]


def median_ms(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):8.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-path", default=None, help="default: SmolLM2's")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--stream", choices=["docs", "random"], default="docs")
    parser.add_argument("--threads", nargs="+", default=["1", "2", "8", "auto"])
    parser.add_argument("--split", type=int, default=min(8, os.cpu_count() or 1),
                        help="Python threads of the split accept")
    args = parser.parse_args()
    import xgrammar as xgr

    if args.tokenizer_path is None:
        from tests.model_factory import smollm2_tokenizer
        tokenizer = smollm2_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    stops = [tokenizer.eos_token_id]
    backend = XGrammarBackend(tokenizer, QWEN3_VOCAB, stops, max_threads=4)
    compiled = backend.compile(("json_schema", json.dumps(records_schema(300))))
    threads = [t if t == "auto" else int(t) for t in args.threads]
    batchers = {t: xgr.BatchGrammarMatcher(t) for t in threads}
    split = args.split
    pool = ThreadPoolExecutor(split)
    names = ["single", "batch", f"split{split}"] + [f"fill{t}" for t in threads]
    matchers: dict[str, list[Any]] = {
        n: [XGrammarBackend.new_matcher(compiled, stops) for _ in range(args.batch)]
        for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    docs = [tokenizer.encode(document(rng, r), add_special_tokens=False)
            for r in range(args.batch)]
    bitmask = torch.empty(xgr.get_bitmask_shape(args.batch, QWEN3_VOCAB), dtype=torch.int32)
    chunk = -(-args.batch // split)

    def accept_rows(ms: list[Any], tokens: list[int], lo: int) -> None:
        for m, t in zip(ms[lo:lo + chunk], tokens[lo:lo + chunk]):
            m.accept_token(t)

    for step in range(args.steps):
        for t in threads:
            start = time.perf_counter()
            batchers[t].batch_fill_next_token_bitmask(matchers[f"fill{t}"], bitmask)
            times[f"fill{t}"].append(time.perf_counter() - start)
        tokens = ([d[step] for d in docs] if args.stream == "docs"
                  else random_allowed(bitmask, QWEN3_VOCAB, rng))
        for t in threads:  # untimed: the fill sets only need to follow the stream
            xgr.BatchGrammarMatcher.batch_accept_token(matchers[f"fill{t}"], tokens)
        for name in names[:3]:
            ms = matchers[name]
            start = time.perf_counter()
            if name == "single":
                for m, t in zip(ms, tokens):
                    m.accept_token(t)
            elif name == "batch":
                xgr.BatchGrammarMatcher.batch_accept_token(ms, tokens)
            else:
                list(pool.map(lambda lo: accept_rows(ms, tokens, lo),
                              range(0, args.batch, chunk)))
            times[name].append(time.perf_counter() - start)
    print(f"{args.batch} rows, {args.steps} steps, stream {args.stream}, "
          f"{os.cpu_count()} CPUs; median ms per step")
    print("accept  single " + median_ms(times["single"]) + "  batch_accept_token "
          + median_ms(times["batch"]) + f"  split over {split} threads "
          + median_ms(times[f"split{split}"]))
    print("fill    " + "  ".join(f"{t} threads {median_ms(times[f'fill{t}'])}"
                                 for t in threads))


if __name__ == "__main__":
    main()
