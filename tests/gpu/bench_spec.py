"""Speculative decoding's speed: decode tokens per second with and without it, and the
mean accepted length (tokens per verify pass), at a few batch sizes.

    python tests/gpu/bench_spec.py --model-path .bench_models/qwen3-0.6b --load-format dummy
    python tests/gpu/bench_spec.py --model-path M --draft-model-path D \
        --max-total-tokens 200000                                         # adds STANDALONE

The prompts quote a passage back (each is a random passage repeated), which is where
NGRAM drafts are found; with dummy weights the accepted length says little and the
run measures the cost of drafting and verifying. Prints one JSON row per run and a
table at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from radixserve.engine import Engine


def prompts(batch: int, passage_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        passage = [rng.randrange(100, 30000) for _ in range(passage_len)]
        out.append(passage * 3)
    return out


def run(args: argparse.Namespace, spec: dict, batch: int) -> dict:
    eng = Engine(model_path=args.model_path, load_format=args.load_format,
                 skip_tokenizer_init=True, mem_fraction_static=args.mem_fraction_static,
                 max_total_tokens=args.max_total_tokens, **spec)
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    try:
        eng.generate(input_ids=prompts(batch, args.passage_len, 0), sampling_params=params)
        ids = prompts(batch, args.passage_len, 1)
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=ids, sampling_params=params)
        dt = time.perf_counter() - t0
    finally:
        eng.shutdown()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    passes = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    return {"algorithm": spec.get("speculative_algorithm", "off"), "batch": batch,
            "tok_s": tokens / dt, "accept_length": tokens / passes if passes else 1.0,
            "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--draft-model-path", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--passage-len", type=int, default=200)
    ap.add_argument("--num-draft-tokens", type=int, default=8)
    ap.add_argument("--mem-fraction-static", type=float, default=0.6)
    # STANDALONE's draft gets a KV pool with as many slots as the target's: cap both.
    ap.add_argument("--max-total-tokens", type=int, default=None)
    args = ap.parse_args()
    specs: list[dict] = [{}, {"speculative_algorithm": "NGRAM",
                              "speculative_num_draft_tokens": args.num_draft_tokens}]
    if args.draft_model_path:
        specs.append({"speculative_algorithm": "STANDALONE", "speculative_num_steps": 3,
                      "speculative_draft_model_path": args.draft_model_path})
    rows = []
    for batch in args.batch_sizes:
        for spec in specs:
            row = run(args, spec, batch)
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = {r["batch"]: r["tok_s"] for r in rows if r["algorithm"] == "off"}
    print(f"{'algorithm':<11} {'batch':>5} {'tok/s':>9} {'speed-up':>8} {'accept len':>10}")
    for r in rows:
        print(f"{r['algorithm']:<11} {r['batch']:>5} {r['tok_s']:>9.1f} "
              f"{r['tok_s'] / base[r['batch']]:>8.2f} {r['accept_length']:>10.2f}")


if __name__ == "__main__":
    main()
