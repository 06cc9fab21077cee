"""NGRAM speculative decoding: greedy output equals greedy output without speculation,
token for token, in every scheduling configuration; the drafts are really accepted;
stop conditions inside an accepted chain, aborts and retraction leave no KV behind."""

from __future__ import annotations

import random

import pytest

from radixserve.configs.speculative_config import SpeculativeConfig
from radixserve.engine import Engine
from radixserve.speculative.ngram import NgramDrafter, NgramTrie
from tests.model_factory import ARCHS, make_tiny_checkpoint, smollm2_tokenizer

GREEDY = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
NGRAM = {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 5}


def quoting_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a passage, so that the n-gram lookup finds drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        passage = [rng.randrange(3, 40000) for _ in range(rng.randrange(4, 24))]
        out.append(passage * rng.randrange(2, 4) + passage[:rng.randrange(1, 4)])
    return out


def assert_no_leak(engine: Engine) -> None:
    info = engine.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.protected_tokens == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


def generate(path: str, prompts, params, **kwargs) -> list[dict]:
    eng = Engine(model_path=path, max_total_tokens=16384, **kwargs)
    try:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert_no_leak(eng)
        return outs
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama")))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_no_speculation_on_every_architecture(arch, tmp_path):
    path = str(make_tiny_checkpoint(arch, tmp_path, with_tokenizer=False))
    prompts = quoting_prompts(7, seed=1)
    params = {**GREEDY, "max_new_tokens": 12}
    expected = generate(path, prompts, params, skip_tokenizer_init=True)
    outs = generate(path, prompts, params, skip_tokenizer_init=True, **NGRAM)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in expected]
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)


@pytest.fixture(scope="module")
def reference(llama):
    prompts = quoting_prompts(7, seed=2)
    outs = generate(llama, prompts, GREEDY)
    return prompts, [o["output_ids"] for o in outs]


@pytest.mark.parametrize("kwargs", [
    {},
    {"disable_radix_cache": True},
    {"chunked_prefill_size": 7},
    {"page_size": 4},
    {"page_size": 4, "chunked_prefill_size": 8},
    {"speculative_num_draft_tokens": 2},
    {"speculative_num_draft_tokens": 9, "speculative_ngram_min_match_window_size": 2},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "radix")
def test_same_tokens_in_every_configuration(llama, reference, kwargs):
    prompts, expected = reference
    outs = generate(llama, prompts, GREEDY, **{**NGRAM, **kwargs})
    assert [o["output_ids"] for o in outs] == expected


def test_batch_of_one_and_acceptance_is_real(llama, reference):
    prompts, expected = reference
    for prompt, exp in zip(prompts[:3], expected[:3]):
        out = generate(llama, prompt, GREEDY, **NGRAM)
        assert out["output_ids"] == exp
    # Over the batch, the verify passes yield more than one token on average.
    outs = generate(llama, prompts, GREEDY, **NGRAM)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    passes = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    assert tokens > passes
    for o in outs:
        m = o["meta_info"]
        per_pass = m["completion_tokens"] / m["spec_verify_ct"]
        assert m["spec_accept_length"] == pytest.approx(per_pass)


def test_stops_inside_an_accepted_chain(llama, reference):
    """Stop tokens, stop strings, EOS and max_new_tokens that fall between the drafts a
    pass accepted: the output is cut exactly where it is without speculation."""
    prompts, expected = reference
    tok = smollm2_tokenizer()
    params = []
    for i, exp in enumerate(expected):
        p = {"temperature": 0, "max_new_tokens": 5 + 2 * i}
        if i % 3 == 0:
            p["stop_token_ids"] = [exp[len(exp) // 2]]
        elif i % 3 == 1:
            p["ignore_eos"] = True
        else:
            p["stop"] = tok.decode(exp[6:8]).strip() or None
        params.append(p)
    want = generate(llama, prompts, params)
    got = generate(llama, prompts, params, **NGRAM)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["meta_info"]["finish_reason"] for o in got] == \
        [o["meta_info"]["finish_reason"] for o in want]


def test_requests_that_need_more_than_logits_decode_plainly(llama, reference):
    """Logprobs, penalties and min_new_tokens in the batch: the same tokens (and
    logprobs) as without speculation."""
    prompts, _ = reference
    params = [dict(GREEDY) for _ in prompts]
    params[1]["frequency_penalty"] = 0.5
    params[2]["min_new_tokens"] = 8
    params[4]["logit_bias"] = {"7": 100}  # the drafts' verify reads raw logits
    kw = {"return_logprob": [i == 3 for i in range(len(prompts))]}
    eng_kw = {"max_total_tokens": 16384}
    results = []
    for spec in ({}, NGRAM):
        eng = Engine(model_path=llama, **eng_kw, **spec)
        results.append(eng.generate(input_ids=prompts, sampling_params=params, **kw))
        assert_no_leak(eng)
        eng.shutdown()
    want, got = results
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert got[4]["output_ids"] == [7] * len(got[4]["output_ids"])
    assert got[3]["meta_info"]["output_token_logprobs"] == \
        want[3]["meta_info"]["output_token_logprobs"]


# --- the drafter alone ------------------------------------------------------------

def _config(**kw) -> SpeculativeConfig:
    return SpeculativeConfig(algorithm="NGRAM", num_steps=4, eagle_topk=1,
                             num_draft_tokens=5, **kw)


def test_lookup_continues_the_latest_longest_match():
    d = NgramDrafter(_config(ngram_max_match_window_size=3))
    #        0  1  2  3  4  5  6  7  8  9
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    # Suffix [5, 6, 7] matched at 0..2 (longest, 3 tokens); [6, 7] also at 6..7.
    assert d.lookup(seq, 3) == [8, 9, 1]
    assert d.lookup([1, 2, 3, 4], 3) == []  # the last token never occurred before


def test_min_window_rejects_short_matches():
    d = NgramDrafter(_config(ngram_min_match_window_size=2))
    assert d.lookup([4, 9, 8, 3, 9], 2) == []  # only [9] matches
    assert d.lookup([4, 9, 8, 3, 4, 9], 2) == [8, 3]


def test_shared_trie_drafts_from_other_requests():
    trie = NgramTrie(depth=6, capacity=1000)
    trie.insert([10, 11, 12, 13, 14, 15], 0)
    trie.insert([10, 11, 12, 20], 0)
    trie.insert([30, 11, 12, 13], 0)
    # After [11, 12], 13 followed twice and 20 once.
    assert trie.continuation([11, 12], 3) == [13, 14, 15]
    assert trie.continuation([12, 20], 2) == []
    assert trie.continuation([99], 2) == []
    d = NgramDrafter(_config())
    d.trie = trie
    assert d.lookup([7, 8, 11, 12], 2) == [13, 14]


def test_trie_capacity_bounds_its_size():
    trie = NgramTrie(depth=4, capacity=50)
    rng = random.Random(0)
    for _ in range(100):
        trie.insert([rng.randrange(1000) for _ in range(20)], 0)
    assert trie.num_nodes <= 50 + 20 * 4
