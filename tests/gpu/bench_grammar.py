"""Decode throughput with a JSON-schema grammar against none, through the Engine.

    python tests/gpu/bench_grammar.py --model-path .bench_models/qwen3-0.6b \
        --tokenizer-path .bench_models/tok [--batch-sizes 1 64] [--output-len 256]

Grammars need a tokenizer, and GPU machines lack the SmolLM2 package: save its tokenizer
beside the dummy checkpoints first, on a machine that has it (the repo root):

    python3 -c "import sys; sys.path.insert(0, '.'); from tests.model_factory import \
smollm2_tokenizer; smollm2_tokenizer().save_pretrained('.bench_models/tok')"

The model's vocabulary (151936 for Qwen3) may be larger than the tokenizer's (49152):
the grammar's bitmask covers the model's, and ids the tokenizer lacks stay masked.

Decode throughput is batch * (long - short) / (t_long - t_short) over two runs of the
same prompts that differ only in max_new_tokens, so prefill, grammar compilation and
admission cancel out. The schema ends in a string whose minLength no run can reach, so
the grammar never lets a request finish early and every row decodes the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.engine import Engine  # noqa: E402

_SHORT_LEN = 16


def records_schema(num_records: int, tag_max_len: int | None = None) -> dict[str, Any]:
    """An API-response-like schema: an id and a list of exactly `num_records` small
    records (a free-text tag, a bounded integer, an enum, a boolean). Every record takes
    several tokens, so with num_records >= the tokens a run decodes no request can finish
    early. `tag_max_len` bounds the tag: xgrammar cannot precompute the mask of a
    length-bounded string state, so that costs more host time per step. (An unreachable
    minLength would also prevent early finishes, but it made xgrammar's accept ~10x
    slower per token at 4,096 characters.)"""
    tag: dict[str, Any] = {"type": "string"}
    if tag_max_len is not None:
        tag["maxLength"] = tag_max_len
    record = {"type": "object", "properties": {
        "tag": tag,
        "score": {"type": "integer", "minimum": 0, "maximum": 999},
        "status": {"enum": ["ok", "error", "pending"]},
        "ok": {"type": "boolean"}},
        "required": ["tag", "score", "status", "ok"], "additionalProperties": False}
    return {"type": "object", "properties": {
        "id": {"type": "integer"},
        "records": {"type": "array", "items": record, "minItems": num_records,
                    "maxItems": num_records}},
        "required": ["id", "records"], "additionalProperties": False}


def wide_schema(num_fields: int, tag_max_len: int | None = None) -> dict[str, Any]:
    """One wide object: `num_fields` required fields in a fixed order, cycling through a
    free-text string, a bounded integer, an enum and a boolean (no repetition at all).
    Every field takes several tokens, so with num_fields >= the tokens a run decodes no
    request can finish early. `tag_max_len` bounds the free-text fields."""
    text: dict[str, Any] = {"type": "string"}
    if tag_max_len is not None:
        text["maxLength"] = tag_max_len
    kinds = [text, {"type": "integer", "minimum": 0, "maximum": 999},
             {"enum": ["ok", "error", "pending"]}, {"type": "boolean"}]
    names = [f"field_{i}" for i in range(num_fields)]
    return {"type": "object",
            "properties": {name: kinds[i % len(kinds)] for i, name in enumerate(names)},
            "required": names, "additionalProperties": False}


SCHEMAS = {"records": records_schema, "wide": wide_schema}


def timed_run(engine: Engine, prompts: list[list[int]], params: dict[str, Any],
              max_new_tokens: int) -> float:
    """Seconds to run the batch; every request must decode exactly max_new_tokens."""
    start = time.perf_counter()
    results = engine.generate(input_ids=prompts,
                              sampling_params={**params, "max_new_tokens": max_new_tokens})
    seconds = time.perf_counter() - start
    counts = {r["meta_info"]["completion_tokens"] for r in results}
    if counts != {max_new_tokens}:
        raise RuntimeError(f"requests finished early: completion tokens {sorted(counts)}")
    return seconds


def decode_tok_s(engine: Engine, prompts: list[list[int]], params: dict[str, Any],
                 output_len: int, repeats: int) -> float:
    timed_run(engine, prompts, params, _SHORT_LEN)  # warm-up: graphs, grammar compile
    short = min(timed_run(engine, prompts, params, _SHORT_LEN) for _ in range(repeats))
    long = min(timed_run(engine, prompts, params, _SHORT_LEN + output_len)
               for _ in range(repeats))
    return len(prompts) * output_len / (long - short)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=".bench_models/qwen3-0.6b")
    parser.add_argument("--tokenizer-path", default=".bench_models/tok")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--schema", choices=sorted(SCHEMAS), default="records",
                        help="records: an id and a list of exactly N records; wide: one "
                             "object of N typed fields (N: more than a run can write)")
    parser.add_argument("--tag-max-len", type=int, default=None,
                        help="bound the schema's free-text field (see bench_schema)")
    args = parser.parse_args(argv)

    # No radix cache: both timed runs then prefill the same tokens.
    engine = Engine(args.model_path, tokenizer_path=args.tokenizer_path,
                    load_format=args.load_format, device=args.device,
                    disable_radix_cache=True, cuda_graph_max_bs=max(args.batch_sizes))
    tokenizer_vocab = len(engine.tokenizer)
    rng = random.Random(0)
    plain = {"temperature": 0, "ignore_eos": True}
    constrained = {**plain, "json_schema": json.dumps(
        SCHEMAS[args.schema](_SHORT_LEN + args.output_len, args.tag_max_len))}
    rows = []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(10, tokenizer_vocab) for _ in range(args.input_len)]
                   for _ in range(batch)]
        none = decode_tok_s(engine, prompts, plain, args.output_len, args.repeats)
        schema = decode_tok_s(engine, prompts, constrained, args.output_len, args.repeats)
        rows.append((batch, none, schema))
    engine.shutdown()

    print(f"model {args.model_path} ({args.load_format}), tokenizer vocab {tokenizer_vocab}, "
          f"input {args.input_len}, decode {args.output_len} tokens, "
          f"schema {args.schema}, tag maxLength {args.tag_max_len}")
    print(f"{'batch':>5}  {'none tok/s':>11}  {'json_schema tok/s':>17}  {'slowdown':>8}")
    for batch, none, schema in rows:
        print(f"{batch:>5}  {none:>11.1f}  {schema:>17.1f}  {100 * (1 - schema / none):>7.1f}%")


if __name__ == "__main__":
    main()
