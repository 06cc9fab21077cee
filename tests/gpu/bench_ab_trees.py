"""Speed of two source trees side by side, in one device call: each workload runs on
tree A, B, B, A (so drift over the call cancels), each run in a process of its own
with that tree first on PYTHONPATH.

    python tests/gpu/bench_ab_trees.py --trees gpu_before . [--workloads decode-8b ...]

Workloads (docs/benchmarks.md names): decode-8b and decode-0.6b are `decode-bs1`
(bench.one_batch with --floor, so each run measures its own floor), offline-0.6b is
`offline-256` (bench.offline_throughput). Prints one table at the end; every run's JSON
row goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DECODE = ["-m", "radixserve.bench.one_batch", "--load-format", "dummy", "--batch-size", "1",
          "--input-len", "128", "--output-len", "256", "--floor"]
WORKLOADS: dict[str, list[str]] = {
    "decode-8b": DECODE + ["--model-path", ".bench_models/qwen3-8b",
                           "--mem-fraction-static", "0.6"],
    "decode-0.6b": DECODE + ["--model-path", ".bench_models/qwen3-0.6b",
                             "--mem-fraction-static", "0.6"],
    "offline-0.6b": ["-m", "radixserve.bench.offline_throughput", "--model-path",
                     ".bench_models/qwen3-0.6b", "--load-format", "dummy", "--dataset",
                     "random", "--num-prompts", "256"],
}


def run_one(tree: str, args: list[str], timeout_s: float) -> dict:
    root = Path(tree).resolve()
    # `python -m` puts its working directory ahead of PYTHONPATH: run from the tree's own
    # directory, or the repository's radixserve would be the one imported whatever `tree`
    # says. Relative paths in the arguments (the model folders) stay relative to here.
    args = [str(Path(a).resolve()) if a.startswith(".bench_models") else a for a in args]
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as f:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(root), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, *args, "--result-file", f.name], env=env,
                              cwd=root, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{tree} {args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    return rows[-1]


def headline(name: str, row: dict) -> tuple[float, str]:
    """The figure compared (higher is better) and a short text with its floor."""
    if name.startswith("decode"):
        frac = row.get("decode_frac_of_floor")
        return row["decode_tok_s"], (
            f"{row['decode_median_ms']:.3f} ms, {row['decode_tok_s']:.1f} tok/s"
            + (f", {frac:.1%} of floor" if frac is not None else ""))
    return row["output_tok_s"], f"{row['output_tok_s']:.0f} tok/s, {row['wall_s']:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="append every run's row here (JSON lines)")
    args = parser.parse_args()
    a, b = args.trees
    table = []
    for name in args.workloads:
        figures: dict[str, list[float]] = {a: [], b: []}
        for tree in (a, b, b, a):
            row = run_one(tree, WORKLOADS[name], args.timeout)
            value, text = headline(name, row)
            figures[tree].append(value)
            print(f"{name} [{tree}]: {text}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"workload": name, "tree": tree, **row}) + "\n")
        ma, mb = statistics.mean(figures[a]), statistics.mean(figures[b])
        table.append((name, figures[a], figures[b], mb / ma - 1))
    print(f"\n| workload | {a} | {b} | {b} vs {a} |\n| --- | --- | --- | --- |")
    for name, fa, fb, delta in table:
        print(f"| {name} | {' / '.join(f'{x:.1f}' for x in fa)} | "
              f"{' / '.join(f'{x:.1f}' for x in fb)} | {delta:+.2%} |")


if __name__ == "__main__":
    main()
