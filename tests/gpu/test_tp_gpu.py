"""TP and DP on two GPUs (NCCL): outputs equal the single-GPU run on a tiny float32 model.

    python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_tp_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

TOP = 5


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (1, 7, 33, 130)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.model_factory import make_tiny_checkpoint

    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"),
                                    with_tokenizer=False))


def _generate(path: str, **kw: object) -> list[dict]:
    from radixserve.engine import Engine

    with Engine(path, skip_tokenizer_init=True, dtype="float32", max_total_tokens=16384,
                mem_fraction_static=0.5, cuda_graph_max_bs=8, **kw) as engine:
        return engine.generate(input_ids=_prompts(), return_logprob=True, top_logprobs_num=TOP,
                               sampling_params={"temperature": 0, "max_new_tokens": 32})


def _assert_same(ref: list[dict], got: list[dict]) -> None:
    for r, g in zip(ref, got):
        assert g["output_ids"] == r["output_ids"]
        for want, have in zip(r["meta_info"]["output_top_logprobs"],
                              g["meta_info"]["output_top_logprobs"]):
            assert max(abs(a[0] - b[0]) for a, b in zip(want, have)) < 1e-4


@pytest.fixture(scope="module")
def reference(checkpoint: str) -> list[dict]:
    return _generate(checkpoint)


def test_tp2_equals_tp1_float32(checkpoint: str, reference: list[dict]) -> None:
    # CUDA graphs on (decode batches up to 8 replay with NCCL all-reduces captured).
    _assert_same(reference, _generate(checkpoint, tp_size=2))


def test_tp2_eager_equals_tp1(checkpoint: str, reference: list[dict]) -> None:
    _assert_same(reference, _generate(checkpoint, tp_size=2, disable_cuda_graph=True))


def test_dp2_equals_dp1(checkpoint: str, reference: list[dict]) -> None:
    _assert_same(reference, _generate(checkpoint, dp_size=2,
                                      load_balance_method="shortest_queue"))
