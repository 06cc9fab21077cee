"""bench.startup_time launches a real server and times it to /health and to the first
answered request, reporting the start-up log lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.bench import startup_time
from tests.model_factory import make_tiny_checkpoint


def test_startup_time_reports_both_times(tmp_path: Path, capsys: pytest.CaptureFixture
                                         ) -> None:
    path = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    result = tmp_path / "rows.jsonl"
    startup_time.main(["--result-file", str(result), "--model-path", str(path),
                       "--max-total-tokens", "1024"])
    row = json.loads(result.read_text().splitlines()[0])
    assert json.loads(capsys.readouterr().out) == row
    assert 0 < row["launch_to_health_s"] <= row["launch_to_first_answer_s"]
    lines = row["startup_lines"]
    assert any(line.startswith("loaded LlamaForCausalLM") for line in lines), lines
    assert any(line.startswith("KV cache: 1024 tokens") for line in lines), lines
