"""STANDALONE speculative decoding (a smaller draft model): greedy output equals
greedy output without speculation; a draft that agrees with the target has nearly all
its drafts accepted (its KV stays in step with the target's); a draft of another
vocabulary is refused before any model loads."""

from __future__ import annotations

import pytest

from radixserve.server_args import ServerArgs
from tests.model_factory import make_tiny_checkpoint
from tests.test_spec_ngram import generate, quoting_prompts
from tests.test_spec_sampling import tiny_vocab_checkpoint

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("target"),
                                    with_tokenizer=False))


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    return str(make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("draft"), seed=1,
                                    with_tokenizer=False))


@pytest.fixture(scope="module")
def reference(target):
    prompts = quoting_prompts(7, seed=5)
    outs = generate(target, prompts, GREEDY, skip_tokenizer_init=True)
    return prompts, [o["output_ids"] for o in outs]


def standalone(draft: str, steps: int = 3) -> dict:
    return {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": draft,
            "speculative_num_steps": steps, "skip_tokenizer_init": True}


def test_draft_equal_to_target_is_accepted_almost_always(target, reference):
    prompts, expected = reference
    outs = generate(target, prompts, GREEDY, **standalone(target))
    assert [o["output_ids"] for o in outs] == expected
    tokens = sum(o["meta_info"]["completion_tokens"] - 1 for o in outs)
    passes = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    # 15 decode tokens per request at up to 4 per pass: 4 passes each if all accepted.
    assert passes <= 5 * len(prompts)
    assert tokens / passes > 3.0


@pytest.mark.parametrize("kwargs", [
    {},
    {"disable_radix_cache": True},
    {"chunked_prefill_size": 7},
    {"page_size": 4},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "radix")
def test_another_draft_gives_the_same_tokens(target, other_draft, reference, kwargs):
    prompts, expected = reference
    outs = generate(target, prompts, GREEDY, **standalone(other_draft), **kwargs)
    assert [o["output_ids"] for o in outs] == expected
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)


def test_batch_of_one_with_five_steps(target, other_draft, reference):
    prompts, expected = reference
    out = generate(target, prompts[0], GREEDY, **standalone(other_draft, steps=5))
    assert out["output_ids"] == expected[0]


def test_draft_with_another_vocabulary_is_refused(target, tmp_path):
    small = tiny_vocab_checkpoint(tmp_path / "v8", seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        ServerArgs(model_path=target, **standalone(small))
