"""decode-bs1 Qwen3-8B and offline-256 Qwen3-0.6B, the HEAD tree (gpu_before/) against
the working tree in one call (decode A B B A; offline A B Bm Bm B A, Bm with
--enable-metrics), then block-FP8 and bf16 decode-bs1 on the working tree
(docs/benchmarks.md, 2026-12-02).

    python tests/gpu/bench_ab_metrics.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ab_trees import DECODE, WORKLOADS, headline, run_one  # noqa: E402

A, B = "gpu_before", "."


def main() -> None:
    plan = [("decode-8b", tree, []) for tree in (A, B, B, A)]
    plan += [("offline-0.6b", tree, extra) for tree, extra in (
        (A, []), (B, []), (B, ["--enable-metrics"]), (B, ["--enable-metrics"]), (B, []),
        (A, []))]
    for name, tree, extra in plan:
        t0 = time.time()
        try:
            text = headline(name, run_one(tree, WORKLOADS[name] + extra, 200))[1]
        except Exception as exc:  # noqa: BLE001 - one failed run must not hide the rest
            text = f"FAILED {str(exc)[-600:]}"
        print(f"{name}{' +metrics' if extra else ''} [{tree}]: {text}  "
              f"({time.time() - t0:.0f}s)", flush=True)
    for model in ("qwen3-8b-fp8", "qwen3-8b"):
        args = DECODE + ["--model-path", f".bench_models/{model}", "--mem-fraction-static", "0.6"]
        try:
            row = run_one(B, args, 200)
            print(model, headline("decode", row)[1],
                  json.dumps({"decode_floor_ms": row.get("decode_floor_ms")}), flush=True)
        except Exception as exc:  # noqa: BLE001
            print(model, "FAILED", str(exc)[-1500:], flush=True)


if __name__ == "__main__":
    main()
