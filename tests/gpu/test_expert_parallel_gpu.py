"""Expert parallelism on CUDA (NCCL), tiny float32 MoE checkpoints, against one GPU
without it: greedy tokens identical, top logprobs within 1e-4.

One GPU: the expert-parallel layer path alone (redundant slots, EPLB rebalancing every
few passes, the recorder), with the Triton experts kernel under it. Two GPUs: EP=2
inside TP, and DP-attention, each with EPLB.

    python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_expert_parallel_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

TOP = 5
ARCHS = ["qwen3-moe", "deepseek-v3"]
EPLB = {"ep_num_redundant_experts": 2, "enable_eplb": True, "eplb_rebalance_num_iterations": 3}


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (1, 7, 33, 130)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.moe_factory import make_tiny_moe_checkpoint

    root = tmp_path_factory.mktemp("ep")
    return {a: str(make_tiny_moe_checkpoint(a, root / a, with_tokenizer=False)) for a in ARCHS}


def _generate(path: str, **kw: object) -> list[dict]:
    from radixserve.engine import Engine

    with Engine(path, skip_tokenizer_init=True, dtype="float32", max_total_tokens=16384,
                mem_fraction_static=0.5, disable_radix_cache=True, **kw) as engine:
        return engine.generate(input_ids=_prompts(), return_logprob=True, top_logprobs_num=TOP,
                               sampling_params={"temperature": 0, "max_new_tokens": 24,
                                                "ignore_eos": True})


def _assert_same(ref: list[dict], got: list[dict]) -> None:
    for r, g in zip(ref, got):
        assert g["output_ids"] == r["output_ids"]
        for want, have in zip(r["meta_info"]["output_top_logprobs"],
                              g["meta_info"]["output_top_logprobs"]):
            assert max(abs(a[0] - b[0]) for a, b in zip(want, have)) < 1e-4


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, str]) -> dict[str, list[dict]]:
    return {a: _generate(p, disable_cuda_graph=True) for a, p in checkpoints.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_one_gpu_expert_layers_with_eplb_and_recorder(arch: str, checkpoints: dict[str, str],
                                                      references: dict[str, list[dict]]) -> None:
    _assert_same(references[arch], _generate(checkpoints[arch], **EPLB,
                                             expert_distribution_recorder_mode="stat"))


@two_gpus
@pytest.mark.parametrize("arch", ARCHS)
def test_ep2_with_eplb_equals_one_gpu(arch: str, checkpoints: dict[str, str],
                                      references: dict[str, list[dict]]) -> None:
    _assert_same(references[arch], _generate(checkpoints[arch], tp_size=2, ep_size=2, **EPLB))


@two_gpus
@pytest.mark.parametrize("arch", ARCHS)
def test_dp_attention_with_eplb_equals_one_gpu(arch: str, checkpoints: dict[str, str],
                                               references: dict[str, list[dict]]) -> None:
    _assert_same(references[arch], _generate(checkpoints[arch], tp_size=2, dp_size=2,
                                             ep_size=2, enable_dp_attention=True, **EPLB))
