"""NGRAM speculative decoding under KV pressure: retraction gives the same tokens, and
after 200 requests, finished and aborted, every KV slot and request row is free."""

from __future__ import annotations

import random

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from tests.abort_driver import run_with_random_aborts
from tests.test_spec_ngram import NGRAM, assert_no_leak, generate
from tests.test_spec_sampling import VOCAB, tiny_vocab_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # A vocabulary of 8: the logits cost nothing, and n-gram drafts are found often.
    return tiny_vocab_checkpoint(tmp_path_factory.mktemp("v8"), seed=0)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_memory_pressure_retracts_and_matches(llama, page_size):
    batch = prompts(24, seed=3)
    params = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
    want = generate(llama, batch, params, page_size=page_size,
                    skip_tokenizer_init=True)
    # 24 requests need about 24 * (20 + 64) tokens; give them an eighth of that (and
    # admission, which expects a request to use part of max_new_tokens, over-admits).
    eng = Engine(model_path=llama, max_total_tokens=256, page_size=page_size,
                 skip_tokenizer_init=True, **NGRAM)
    got = eng.generate(input_ids=batch, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert eng.get_server_info().num_retractions >= 1
    assert sum(o["meta_info"]["spec_verify_ct"] for o in got) > 0
    assert_no_leak(eng)
    eng.shutdown()


def test_200_requests_with_aborts_free_everything(llama):
    eng = Engine(model_path=llama, max_total_tokens=1024, chunked_prefill_size=16,
                 skip_tokenizer_init=True, **NGRAM)
    sched = eng.scheduler
    rng = random.Random(4)
    batch = prompts(200, seed=4)
    rids = []
    for i, ids in enumerate(batch):
        sp = SamplingParams(max_new_tokens=rng.randrange(1, 14), ignore_eos=i % 2 == 0,
                            temperature=0 if i % 3 else 0.8)
        sp.verify()
        sp.normalize()
        sched.add_request(TokenizedGenerateReqInput(f"r{i}", None, ids, sp))
        rids.append(f"r{i}")
    finished = run_with_random_aborts(sched, rng, set(rng.sample(rids, 60)), 3, 10000)
    assert set(finished) == set(rids)
    assert any(r["type"] == "abort" for r in finished.values())
    assert_no_leak(eng)
    rows = sched.kv.req_to_token_pool
    assert rows.available_size() == rows.size
    eng.shutdown()
