"""Speculative sampling keeps the target's distribution, end to end: a tiny-vocabulary
model sampled at temperature 1 with speculation on and off, many requests each (every
one its own random draws); the empirical distributions of the generated tokens must
agree (chi-square tests of homogeneity, each failing by chance with p < ALPHA)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from radixserve.engine import Engine

VOCAB = 8
ALPHA = 1e-4
N = 800
PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]  # the n-gram lookup drafts 4, 1, 2, 3, ...
PARAMS = {"temperature": 1.0, "max_new_tokens": 5, "ignore_eos": True}


def tiny_vocab_checkpoint(path, seed: int, layers: int = 2) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.5, bos_token_id=0,
                      eos_token_id=7, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_vocab_checkpoint(tmp_path_factory.mktemp("target"), seed=0)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return tiny_vocab_checkpoint(tmp_path_factory.mktemp("draft"), seed=1, layers=1)


def sample(path: str, **kwargs) -> list[dict]:
    eng = Engine(model_path=path, skip_tokenizer_init=True, max_total_tokens=8192,
                 random_seed=kwargs.pop("random_seed", 0), **kwargs)
    try:
        return eng.generate(input_ids=[PROMPT] * N, sampling_params=PARAMS)
    finally:
        eng.shutdown()


def _homogeneous(a: list, b: list) -> float:
    keys = sorted(set(a) | set(b))
    ca, cb = Counter(a), Counter(b)
    table = np.array([[ca[k] for k in keys], [cb[k] for k in keys]])
    return chi2_contingency(table).pvalue


@pytest.fixture(scope="module")
def plain(target):
    return [o["output_ids"] for o in sample(target, random_seed=1)]


@pytest.mark.parametrize("algo", ["NGRAM", "STANDALONE"])
def test_speculative_sampling_keeps_the_distribution(target, draft, plain, algo):
    kw = {"speculative_algorithm": algo}
    if algo == "STANDALONE":
        kw.update(speculative_draft_model_path=draft, speculative_num_steps=3)
    else:
        kw.update(speculative_num_draft_tokens=4)
    outs = sample(target, random_seed=2, **kw)
    spec = [o["output_ids"] for o in outs]
    # Speculation really ran and both accepted and rejected drafts.
    passes = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert passes < tokens - N < 4 * passes  # 3 drafts per pass at most
    for pos in range(1, 5):  # token 0 comes from the prefill, before any draft
        p = _homogeneous([s[pos] for s in spec], [s[pos] for s in plain])
        assert p > ALPHA, f"token {pos}: chi-square p={p:.2e}"
    p = _homogeneous([tuple(s[1:3]) for s in spec], [tuple(s[1:3]) for s in plain])
    assert p > ALPHA, f"tokens 1-2 jointly: chi-square p={p:.2e}"
