"""The CPU path of tests/gpu/bench_vl.py on a tiny Qwen2.5-VL config: both engines run
and every figure is reported (the GPU run must work the first time)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vl_factory import make_qwen2_5_vl


def test_bench_vl_runs_on_a_tiny_config(tmp_path: Path, capsys) -> None:
    ckpt = make_qwen2_5_vl(tmp_path / "ckpt")
    config_only = tmp_path / "config"
    config_only.mkdir()
    (config_only / "config.json").write_text((ckpt / "config.json").read_text())
    spec = importlib.util.spec_from_file_location(
        "bench_vl", Path(__file__).parent / "gpu" / "bench_vl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--config", str(config_only), "--requests", "3", "--hf-requests", "2",
                       "--output-len", "4", "--image-size", "64", "--device", "cpu",
                       "--dtype", "float32", "--max-total-tokens", "4096"])
    out = capsys.readouterr().out
    assert [r["engine"] for r in rows] == ["radixserve", "hf-transformers"], out
    ours = rows[0]
    assert ours["output_tokens"] == 3 * 4
    assert 0 < ours["encoder_share_of_ttft"] < 1 and ours["encoder_calls"] >= 1
    assert ours["ttft_p50_s"] > 0 and rows[1]["out_tok_per_s"] > 0
    assert "throughput vs HF transformers" in out
    assert json.loads(out.splitlines()[0])["engine"] == "radixserve"
