"""Speculative decoding on the real default model (SmolLM2-135M-Instruct): prompts that
quote a passage back, greedy. NGRAM and STANDALONE (the model as its own draft) give
the tokens of decoding without speculation, with real acceptance."""

from __future__ import annotations

import pytest

from radixserve.engine import Engine
from tests.model_factory import smollm2_gguf_path

PASSAGES = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps under the old oak tree "
    "while the fox runs across the green field towards the river.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n",
]
PARAMS = {"temperature": 0, "max_new_tokens": 32}


def quote_back_chats() -> list[list[dict]]:
    return [[{"role": "user", "content": f"Repeat this text exactly:\n\n{p}"}]
            for p in PASSAGES]


def run(**kwargs) -> list[dict]:
    eng = Engine(max_total_tokens=8192, **kwargs)
    try:
        prompts = [eng.apply_chat_template(c) for c in quote_back_chats()]
        outs = eng.generate(input_ids=prompts, sampling_params=PARAMS)
        info = eng.get_server_info()
        assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
        return outs
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def plain():
    return [o["output_ids"] for o in run()]


@pytest.mark.parametrize("spec", [
    {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 8},
    {"speculative_algorithm": "STANDALONE", "speculative_num_steps": 3},
], ids=["NGRAM", "STANDALONE"])
def test_quote_back_matches_and_accepts(plain, spec):
    if spec["speculative_algorithm"] == "STANDALONE":
        spec = {**spec, "speculative_draft_model_path": smollm2_gguf_path()}
    outs = run(**spec)
    assert [o["output_ids"] for o in outs] == plain
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    passes = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    print(f"{spec['speculative_algorithm']}: mean accepted length "
          f"{tokens / passes:.2f} tokens per verify pass")
    # Quoting text back, the drafts are right more often than not.
    assert tokens / passes > 1.5
