"""tests/gpu/bench_moe_decode.py runs end to end at a tiny shape (on CPU in Triton's
interpreter), so that the GPU run finds no broken argument or import; its checks of
every path against the references run too."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.gpu import bench_moe_decode  # noqa: E402


def test_bench_runs_every_path_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_moe_decode.main(["--device", device, "--model", "tiny", "--tokens", "1", "5",
                           "--routing-tokens", "2", "--tp", "1", "2"])
    lines = capsys.readouterr().out.splitlines()
    routing = lines[lines.index("tokens | fused_ms | select_experts_ms | speedup") + 1]
    assert routing.split(" | ")[0] == "2"
    rows = [line.split(" | ") for line in lines if line[:2] in ("1 ", "5 ")]
    # tiny: E=8, top-2, so T=5 is past use_small_batch's T*k <= E
    assert [(r[0], r[8]) for r in rows] == [("1", "small"), ("5", "grouped")] * 2
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--model", "qwen3-30b-a3b", "--tp", "5"],
                                  ["--model", "nope"]])
def test_bench_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_moe_decode.parse_args(["--device", "cpu", *argv])
    assert exc.value.code == 2
