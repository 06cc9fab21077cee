"""The offline Engine end to end on tiny random models, against HF transformers."""

from __future__ import annotations

import pytest
import torch

from radixserve.engine import Engine
from tests.model_factory import ARCHS, make_tiny_checkpoint, smollm2_tokenizer

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog because",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled "
    "with the ends of worms and an oozy smell, nor yet a dry, bare, sandy hole",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    engine = Engine(model_path=str(path), max_total_tokens=8192)
    yield request.param, engine, hf
    engine.shutdown()


def hf_greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: full recompute each step, no cache, no padding."""
    seq = list(ids)
    logits_per_step = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([seq])).logits[0, -1].float()
            logits_per_step.append(logits)
            seq.append(int(logits.argmax()))
    return seq[len(ids):], logits_per_step


def test_greedy_batch_matches_hf(tiny):
    arch, engine, hf = tiny
    tok = smollm2_tokenizer()
    outs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                     "ignore_eos": True}, return_logprob=True,
                           top_logprobs_num=5)
    for prompt, out in zip(PROMPTS, outs):
        ref_ids, ref_logits = hf_greedy(hf, tok.encode(prompt), NEW_TOKENS)
        assert out["output_ids"] == ref_ids, f"{arch}: greedy tokens differ for {prompt!r}"
        assert out["meta_info"]["completion_tokens"] == NEW_TOKENS
        # Our logprobs are log_softmax of the raw logits: compare every step's top-5.
        for step, (top, ref) in enumerate(zip(out["meta_info"]["output_top_logprobs"],
                                              ref_logits)):
            ref_lp = torch.log_softmax(ref, -1)
            ours = torch.tensor([lp for lp, _ in top])
            theirs = ref_lp[[tid for _, tid in top]]
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4,
                                       msg=f"{arch} step {step}")


def test_batch_invariance(tiny):
    """A greedy request gives the same tokens alone and inside a mixed batch of 16."""
    _, engine, _ = tiny
    target = PROMPTS[1]
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    alone = engine.generate(target, greedy)["output_ids"]
    others = [p * (k % 3 + 1) for k, p in enumerate(PROMPTS * 4)][:15]
    params = [{"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8 + k, "seed": k,
               "ignore_eos": True} for k in range(15)]
    outs = engine.generate(others[:7] + [target] + others[7:],
                           params[:7] + [greedy] + params[7:])
    assert outs[7]["output_ids"] == alone


def test_seeded_sampling_is_reproducible(tiny):
    _, engine, _ = tiny
    sp = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 1234,
          "ignore_eos": True}
    a = engine.generate(PROMPTS[0], sp)["output_ids"]
    b = engine.generate(PROMPTS[0], sp)["output_ids"]
    c = engine.generate(PROMPTS[0], {**sp, "seed": 99})["output_ids"]
    assert a == b
    assert a != c  # 16 draws at temperature 1 over 49k tokens: a collision is ~impossible


def test_top_k_1_equals_greedy(tiny):
    _, engine, _ = tiny
    base = {"max_new_tokens": 12, "ignore_eos": True}
    greedy = engine.generate(PROMPTS[2], {**base, "temperature": 0})["output_ids"]
    topk1 = engine.generate(PROMPTS[2], {**base, "temperature": 0.7, "top_k": 1})["output_ids"]
    assert greedy == topk1


def test_stream_matches_non_stream(tiny):
    _, engine, _ = tiny
    sp = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    full = engine.generate(PROMPTS[3], sp)
    pieces = list(engine.generate(PROMPTS[3], sp, stream=True))
    assert "".join(p["text"] for p in pieces) == full["text"]
    assert sum((p["output_ids"] for p in pieces), []) == full["output_ids"]
    assert pieces[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_n_samples_and_stop_token(tiny):
    _, engine, _ = tiny
    outs = engine.generate(PROMPTS[0], {"temperature": 1.0, "n": 3, "max_new_tokens": 8,
                                        "seed": 7, "ignore_eos": True})
    assert len(outs) == 3 and len({tuple(o["output_ids"]) for o in outs}) > 1
    greedy = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 8,
                                          "ignore_eos": True})["output_ids"]
    stop_at = greedy[3]
    out = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 8,
                                       "stop_token_ids": [stop_at], "ignore_eos": True})
    assert out["output_ids"] == greedy[:greedy.index(stop_at) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}


def test_min_new_tokens_and_zero_max(tiny):
    _, engine, _ = tiny
    out = engine.generate(PROMPTS[0], {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"]["type"] == "length"
    out = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 6,
                                       "min_new_tokens": 6})
    assert len(out["output_ids"]) == 6


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2),
    ("max_new_tokens", -1), ("n", 0), ("min_p", 2.0)])
def test_invalid_sampling_params_name_the_field(tiny, field, value):
    _, engine, _ = tiny
    with pytest.raises(ValueError, match=field):
        engine.generate("hi", {field: value})


def test_bad_prompts(tiny):
    _, engine, _ = tiny
    # SGLang rejects an empty prompt rather than generating from nothing; so do we.
    with pytest.raises(ValueError, match="empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * 2000)
    with pytest.raises(ValueError, match="outside"):
        engine.generate(input_ids=[1, 10**7])
    with pytest.raises(ValueError, match="unknown"):
        engine.generate("hi", {"temprature": 1.0})
    info = engine.get_server_info()
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


@pytest.mark.parametrize("start", [0, 5])
def test_prompt_logprobs_match_hf(tiny, start):
    """input_token_logprobs[i] is log P(prompt[start + i] | earlier tokens), like HF's."""
    arch, engine, hf = tiny
    ids = smollm2_tokenizer().encode(PROMPTS[3])
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1},
                          return_logprob=True, logprob_start_len=start, top_logprobs_num=3)
    got = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t in got] == ids[start:]
    if start == 0:
        assert got[0][0] is None  # the first token has no context
    for pos, (lp, tok) in enumerate(got):
        p = start + pos
        if p == 0:
            continue
        assert lp == pytest.approx(float(ref[p - 1, tok]), rel=1e-4, abs=1e-4), (arch, p)
    top = out["meta_info"]["input_top_logprobs"][-1]
    assert [t for _, t in top] == ref[len(ids) - 2].topk(3).indices.tolist()


def test_prompt_logprobs_with_chunks_and_cached_prefix(tmp_path):
    """Chunked prefill and a cached prefix must not change (or skip) prompt logprobs."""
    path = make_tiny_checkpoint("llama", tmp_path / "m")
    ids = smollm2_tokenizer().encode(PROMPTS[3])
    plain = Engine(model_path=str(path), max_total_tokens=4096, chunked_prefill_size=-1)
    ref = plain.generate(input_ids=ids, sampling_params={"max_new_tokens": 1},
                         return_logprob=True, logprob_start_len=0)["meta_info"]
    eng = Engine(model_path=str(path), max_total_tokens=4096, chunked_prefill_size=7)
    eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})  # caches the prompt
    got = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1},
                       return_logprob=True, logprob_start_len=0)["meta_info"]
    assert [t for _, t in got["input_token_logprobs"]] == ids
    for (a, _), (b, _) in zip(got["input_token_logprobs"][1:], ref["input_token_logprobs"][1:]):
        assert a == pytest.approx(b, abs=1e-4)
    # Logprobs need the logits of every prompt position, so the cache was not used.
    assert got["cached_tokens"] == 0
