"""Speculative decoding on the GPU (Triton attention; the plain path replays CUDA
graphs): in float32, greedy output with NGRAM and STANDALONE equals greedy output
without speculation, and the KV pool is all free afterwards."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PARAMS = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}


def _prompts(n: int = 8) -> list[list[int]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        passage = [rng.randrange(3, 40000) for _ in range(rng.randrange(4, 40))]
        out.append(passage * 3)
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from tests.model_factory import make_tiny_checkpoint

    target = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("t"), with_tokenizer=False)
    draft = make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("d"), seed=1,
                                 with_tokenizer=False)
    return str(target), str(draft)


def _generate(path: str, **kw) -> list[dict]:
    from radixserve.engine import Engine

    eng = Engine(model_path=path, skip_tokenizer_init=True, max_total_tokens=16384,
                 dtype="float32", mem_fraction_static=0.5, **kw)
    try:
        outs = eng.generate(input_ids=_prompts(), sampling_params=PARAMS)
        info = eng.get_server_info()
        assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
        return outs
    finally:
        eng.shutdown()


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("algo", ["NGRAM", "STANDALONE"])
def test_greedy_matches_without_speculation(paths, algo, page_size):
    target, draft = paths
    want = [o["output_ids"] for o in _generate(target, page_size=page_size)]
    kw = {"speculative_algorithm": algo, "page_size": page_size}
    if algo == "STANDALONE":
        kw["speculative_draft_model_path"] = draft
    outs = _generate(target, **kw)
    assert [o["output_ids"] for o in outs] == want
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
