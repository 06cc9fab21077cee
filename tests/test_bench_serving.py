"""bench.serving end to end against the live server (report correctness, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.bench import serving
from tests.conftest import LiveServer


def _run(server: LiveServer, out: Path, *args: str) -> dict:
    return serving.main(["--base-url", server.url, "--api-key", server.api_key,
                         "--output-file", str(out), *args])


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_random_dataset(server: LiveServer, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "bench.jsonl"
    report = _run(server, out, "--backend", backend, "--dataset-name", "random",
                  "--num-prompts", "4", "--random-input-len", "24", "--random-output-len", "4",
                  "--random-range-ratio", "0.5", "--request-rate", "20",
                  "--max-concurrency", "2")
    assert report["completed"] == 4 and report["failed"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["requests"]) == 4
    reqs = rows[0]["requests"]
    assert report["total_output_tokens"] == sum(r["output_len"] for r in reqs)
    assert all(2 <= r["output_len"] <= 4 for r in reqs)  # ignore_eos, range ratio 0.5
    assert report["total_input_tokens"] == sum(r["prompt_len"] for r in reqs) > 0
    for key in ("ttft", "itl", "tpot", "e2e_latency"):
        assert report[f"mean_{key}_ms"] > 0 and report[f"p99_{key}_ms"] >= report[
            f"median_{key}_ms"] > 0
    assert report["median_ttft_ms"] <= report["median_e2e_latency_ms"]
    assert report["output_throughput"] == pytest.approx(
        report["total_output_tokens"] / report["duration_s"])


def test_shared_prefix_and_sharegpt(server: LiveServer, tmp_path: Path) -> None:
    report = _run(server, tmp_path / "a.jsonl", "--dataset-name", "generated-shared-prefix",
                  "--gsp-num-groups", "2", "--gsp-prompts-per-group", "2",
                  "--gsp-system-prompt-len", "64", "--gsp-question-len", "8",
                  "--gsp-output-len", "3")
    assert report["completed"] == 4 and report["total_output_tokens"] == 12
    data = [{"conversations": [{"from": "human", "value": f"Question number {i}: why is the "
                                "sky blue? Explain."},
                               {"from": "gpt", "value": "Because of Rayleigh scattering."}]}
            for i in range(3)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    report = _run(server, tmp_path / "b.jsonl", "--dataset-name", "sharegpt", "--dataset-path",
                  str(path), "--num-prompts", "3", "--sharegpt-output-len", "3")
    assert report["completed"] == 3 and report["total_output_tokens"] == 9
