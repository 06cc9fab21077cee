"""Quantized checkpoints at TP=2 (gloo, two spawned ranks) give TP=1's greedy tokens and
top logprobs: int4 AWQ, GPTQ with act-order (every rank keeps all groups of the
row-parallel layers), and block FP8 (blocks of 16 fall on the ranks' split, so the
activation scales are the same as at TP=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import quant_checkpoints as qc
from tests.test_models import make_checkpoint
from tests.test_parallel import assert_tp2_matches_tp1

WRITERS = {
    "awq": lambda hf, p: qc.write_awq(hf, p, 32),
    "gptq-act-order": lambda hf, p: qc.write_gptq(hf, p, 32, desc_act=True),
    "fp8-block": lambda hf, p: qc.write_fp8_block(hf, p, (16, 16)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-tp")
    out = {}
    for fmt, write in WRITERS.items():
        hf = make_checkpoint(str(root / f"{fmt}-float"), "qwen3", hidden_size=64,
                             intermediate_size=128, head_dim=16, tie_word_embeddings=False,
                             vocab_size=4096)  # the shared prompts use ids up to 3000
        write(hf, str(root / fmt))
        out[fmt] = root / fmt
    return out


def test_tp2_matches_tp1_quantized(checkpoints: dict[str, Path]) -> None:
    assert_tp2_matches_tp1(checkpoints, timeout_s=180)
