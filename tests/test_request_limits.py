"""Requests that used to crash a server process, stall it, or be answered wrongly are
refused with 400 naming the field, by the one validation path (request_validation.py),
and the server keeps serving. (Part of the hardening issue: the fields below.)"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
import torch

from radixserve.core.sampling_params import SamplingParams
from radixserve.configs.request_limits import DEFAULT_MAX_N as MAX_N
from radixserve.configs.request_limits import RequestLimits
from radixserve.managers.request_validation import (InvalidRequestError, ModelLimits,
                                                    RequestValidator)
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from tests.conftest import LiveServer

LIMITS = ModelLimits(context_len=1024, vocab_size=1000, max_total_num_tokens=4096)


def _param_of(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    with pytest.raises(InvalidRequestError) as info:
        fn(*args, **kwargs)
    return info.value.param


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty",
                                  "frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(name: str, value: float) -> None:
    v = RequestValidator(LIMITS)
    assert _param_of(v.build, [(None, [1, 2, 3])], {name: value}) == name
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value}).verify()


@pytest.mark.parametrize("name", ["ignore_eos", "skip_special_tokens",
                                  "spaces_between_special_tokens", "no_stop_trim"])
@pytest.mark.parametrize("value", [0, 1, "yes", [True], math.nan, None])
def test_flags_must_be_bools(name: str, value: Any) -> None:
    raw = {name: value}
    if value is None:  # a null is "not given": the default applies
        assert RequestValidator(LIMITS).build([(None, [1, 2])], raw)
        return
    assert _param_of(RequestValidator(LIMITS).build, [(None, [1, 2])], raw) == name


def test_n_is_capped_before_any_copy_is_made() -> None:
    v = RequestValidator(LIMITS)
    assert len(v.build([(None, [1, 2])], {"n": MAX_N, "max_new_tokens": 1})) == MAX_N
    t0 = time.perf_counter()
    assert _param_of(v.build, [(None, [1, 2])], {"n": 10 ** 9}) == "n"
    assert time.perf_counter() - t0 < 1.0
    assert _param_of(v.build, [(None, [1, 2])], SamplingParams(n=MAX_N + 1)) == "n"


def test_min_new_tokens_with_no_max_is_checked_against_the_room() -> None:
    """An explicit null max_new_tokens (OpenAI's missing max_tokens) means the rest of
    the context, so min_new_tokens above the default of 128 is fine."""
    v = RequestValidator(LIMITS)
    (req,) = v.build([(None, [1] * 24)], {"min_new_tokens": 500, "max_new_tokens": None})
    assert req.sampling_params.max_new_tokens == 1000
    assert req.sampling_params.min_new_tokens == 500
    # Without the null, the default (128) is what min_new_tokens must fit.
    assert _param_of(v.build, [(None, [1] * 24)], {"min_new_tokens": 500}) == "min_new_tokens"


class _NoTokenizer:
    def encode(self, text: str) -> list[int]:
        raise AssertionError("a prompt over the byte limit was tokenized")


def test_request_limits_are_flags() -> None:
    """--max-n, --max-stop-strings, --max-logit-bias-entries and --max-prompt-bytes bound
    a request, each naming its field; a prompt over the byte limit is not tokenized."""
    v = RequestValidator(LIMITS, RequestLimits(max_n=3, max_stop_strings=2,
                                               max_logit_bias_entries=2, max_prompt_bytes=10))
    assert len(v.build([(None, [1])], {"n": 3})) == 3
    assert _param_of(v.build, [(None, [1])], {"n": 4}) == "n"
    assert v.build([(None, [1])], {"stop": ["a", "b"], "stop_token_ids": [1, 2]})
    assert _param_of(v.build, [(None, [1])], {"stop": ["a", "b", "c"]}) == "stop"
    assert _param_of(v.build, [(None, [1])], {"stop_token_ids": [1, 2, 3]}) == "stop_token_ids"
    assert v.build([(None, [1])], {"logit_bias": {"1": 1, "2": 2}})
    assert _param_of(v.build, [(None, [1])], {"logit_bias": {"1": 1, "2": 2, "3": 3}}) \
        == "logit_bias"
    assert _param_of(v.prepare, "é" * 6, None, _NoTokenizer()) == "text"  # 12 bytes
    with pytest.raises(AssertionError, match="was tokenized"):
        v.prepare("é" * 5, None, _NoTokenizer())  # 10 bytes: allowed, so tokenized
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        RequestLimits(max_n=0)


@pytest.mark.parametrize("flag", ["--max-n", "--max-stop-strings", "--max-prompt-bytes",
                                  "--max-request-body-bytes", "--max-json-depth",
                                  "--max-logit-bias-entries"])
def test_limit_flags_refuse_nonsense_at_parse_time(flag: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    import argparse

    from radixserve.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "0"])
    assert f"argument {flag}: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("bias, error", [
    ([1], "must be an object"), ({"-1": 1}, "keys must be token ids"),
    ({"1.5": 1}, "keys must be token ids"), ({"1": 100.5}, "in [-100, 100]"),
    ({"1": math.inf}, "in [-100, 100]"), ({"1": True}, "in [-100, 100]"),
    ({"1000": 1}, "outside [0, 1000)")])
def test_bad_logit_bias_is_refused(bias: Any, error: str) -> None:
    with pytest.raises(InvalidRequestError, match=error.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")) as info:
        RequestValidator(LIMITS).build([(None, [1])], {"logit_bias": bias})
    assert info.value.param == "logit_bias"


class _Req:
    """The fields SamplingBatchInfo reads from a Req."""

    def __init__(self, params: SamplingParams) -> None:
        self.sampling_params = params
        self.output_ids: list[int] = []
        self.origin_input_ids = [1]
        self.eos_token_ids: tuple[int, ...] = ()
        self.grammar = None


def _params(**kwargs: Any) -> SamplingParams:
    params = SamplingParams(**kwargs)
    params.verify()
    params.normalize()
    return params


def test_logit_bias_in_the_sampler_greedy_and_sampled() -> None:
    """Greedy rows take the argmax of logits + bias; sampled rows draw from
    softmax((logits + bias) / T), the distribution the bias defines (chi-square); a
    row without a bias in the same batch is unchanged."""
    from radixserve.layers.sampler import Sampler

    torch.manual_seed(0)
    vocab = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    bias = {"1": 2.5, 5: -100, "3": 1.0}
    greedy = _params(temperature=0, logit_bias=bias)
    plain = _params(temperature=0)
    info = SamplingBatchInfo.from_reqs([_Req(greedy), _Req(plain)], vocab, "cpu")
    both = logits.repeat(2, 1)
    out = Sampler()(both, info)
    biased = logits[0] + torch.tensor([0, 2.5, 0, 1.0, 0, -100])
    assert out.tolist() == [int(biased.argmax()), int(logits[0].argmax())]
    assert torch.equal(both, logits.repeat(2, 1))  # the raw logits stay as they were

    n = 20_000
    sampled = _params(temperature=0.7, logit_bias=bias)
    info = SamplingBatchInfo.from_reqs([_Req(sampled)] * n, vocab, "cpu")
    draws = Sampler()(logits.repeat(n, 1), info)
    counts = torch.bincount(draws, minlength=vocab).double()
    expected = torch.softmax(biased.double() / 0.7, dim=-1) * n
    assert counts[5] == 0  # -100 bans the token
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    # 99.9th percentile of chi-square with (cells - 1) <= 4 degrees of freedom.
    assert chi2 < 18.47, (counts, expected)


# --- through the server (the session's shared SmolLM2 server) ---------------------------

def _post(server: LiveServer, path: str, body: dict) -> Any:
    # json.dumps writes NaN and Infinity literals, as a careless client's encoder does
    # (httpx's json= refuses them).
    with server.client() as c:
        return c.post(path, content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})


BAD_BODIES = [
    # A non-boolean skip_special_tokens crashed the detokenizer process (503 after).
    ("/generate", {"text": "Hi", "sampling_params": {"skip_special_tokens": "yes"}},
     "skip_special_tokens"),
    ("/generate", {"text": "Hi", "sampling_params": {"skip_special_tokens": [1]}},
     "skip_special_tokens"),
    # 0 with a stop string crashed the scheduler process instead.
    ("/generate", {"text": "Hi", "sampling_params": {"skip_special_tokens": 0,
                                                     "stop": ["x"]}}, "skip_special_tokens"),
    ("/generate", {"text": "Hi", "sampling_params": {"no_stop_trim": "no"}}, "no_stop_trim"),
    # NaN was accepted and sampled as a run of token 0.
    ("/generate", {"text": "Hi", "sampling_params": {"temperature": math.nan}}, "temperature"),
    ("/v1/completions", {"model": "default", "prompt": "Hi", "temperature": math.nan},
     "temperature"),
    ("/v1/chat/completions", {"model": "default", "top_p": math.inf,
                              "messages": [{"role": "user", "content": "Hi"}]}, "top_p"),
    # logit_bias was accepted and silently ignored, invalid values too.
    ("/v1/chat/completions", {"model": "default", "logit_bias": {"42": 1000},
                              "messages": [{"role": "user", "content": "Hi"}]}, "logit_bias"),
    ("/v1/completions", {"model": "default", "prompt": "Hi", "logit_bias": {"x": -1}},
     "logit_bias"),
    ("/generate", {"text": "Hi", "sampling_params": {"logit_bias": {"999999": 5}}},
     "logit_bias"),
    ("/generate", {"text": "Hi", "sampling_params": {"logit_bias": {"5": math.nan}}},
     "logit_bias"),
    # The request limits (flags, with their defaults here).
    ("/generate", {"text": "Hi", "sampling_params": {"stop": ["x"] * 65}}, "stop"),
    ("/generate", {"text": "Hi", "sampling_params": {
        "logit_bias": {str(i): 1 for i in range(1025)}}}, "logit_bias"),
    # n had no cap: the copies stalled the event loop for minutes.
    ("/v1/chat/completions", {"model": "default", "n": 10000,
                              "messages": [{"role": "user", "content": "Hi"}]}, "n"),
]


@pytest.mark.parametrize("path, body, param", BAD_BODIES,
                         ids=[f"{p}-{k}" for p, _, k in BAD_BODIES])
def test_bad_fields_get_400_and_the_server_keeps_serving(server: LiveServer, path: str,
                                                         body: dict, param: str) -> None:
    t0 = time.perf_counter()
    resp = _post(server, path, body)
    assert resp.status_code == 400, resp.text
    assert time.perf_counter() - t0 < 10
    err = resp.json()
    got = err["error"]["param"] if "error" in err else err.get("param")
    assert got == param, err
    ok = _post(server, "/generate", {"text": "The capital of France is",
                                     "sampling_params": {"max_new_tokens": 4,
                                                         "temperature": 0}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["meta_info"]["completion_tokens"] == 4
    server.wait_idle()


RAW_BODIES = [
    # Each was a 500: RecursionError, int conversion's digit limit, the tokenizer's
    # TypeError on a lone surrogate, UnicodeEncodeError writing a rid back.
    ("/generate", b"[" * 100_000, None),
    ("/v1/completions", b'{"model": "default", "prompt": "Hi", "max_tokens": 1'
     + b"0" * 5000 + b"}", None),
    ("/generate", b'{"text": "Hi \\ud800 there"}', "text"),
    ("/generate", b'{"text": "Hi", "rid": "\\udfff"}', "rid"),
    ("/v1/chat/completions", b'{"model": "default", "messages": [{"role": "user", '
     b'"content": "\\ud83d"}]}', "messages.0.content"),
]


@pytest.mark.parametrize("path, raw, param", RAW_BODIES,
                         ids=["deep-nesting", "huge-int", "surrogate-text", "surrogate-rid",
                              "surrogate-message"])
def test_malformed_bodies_get_400(server: LiveServer, path: str, raw: bytes,
                                  param: str | None) -> None:
    with server.client() as c:
        resp = c.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text
    with server.client() as c:
        assert c.get("/health").status_code == 200


def test_logit_bias_steers_generation(server: LiveServer) -> None:
    """A +100 bias forces its token on every step; -100 on the greedy choice bans it;
    an empty bias changes nothing (native and OpenAI endpoints)."""
    prompt = "The capital of France is"
    plain = _post(server, "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}}).json()["output_ids"]
    empty = _post(server, "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "logit_bias": {}}}).json()["output_ids"]
    assert empty == plain
    forced = _post(server, "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.8, "logit_bias": {"1234": 100}}}).json()
    assert forced["output_ids"] == [1234] * 6
    banned = _post(server, "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "logit_bias": {str(plain[0]): -100}}}).json()
    assert banned["output_ids"][0] != plain[0]
    assert plain[0] not in banned["output_ids"]
    three = _post(server, "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": 3, "logit_bias": {"1234": 100}}}).json()["text"]
    chat = _post(server, "/v1/chat/completions", {
        "model": "default", "max_tokens": 3, "logit_bias": {"1234": 100},
        "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == three
    server.wait_idle()


def test_body_size_and_depth_limits(server: LiveServer) -> None:
    """A body over --max-request-body-bytes is 413 (read no further than the limit);
    nesting deeper than --max-json-depth is 400."""
    with server.client() as c:
        big = b'{"text": "' + b"a" * (64 << 20) + b'"}'
        resp = c.post("/generate", content=big, headers={"Content-Type": "application/json"})
        assert resp.status_code == 413, resp.text[:200]
        assert "--max-request-body-bytes" in resp.json()["error"]["message"]
        deep = {"text": "Hi", "sampling_params": {"json_schema": None}}
        nested: Any = 1
        for _ in range(70):
            nested = [nested]
        deep["rid"] = nested
        resp = c.post("/generate", json=deep)
        assert resp.status_code == 400
        assert "--max-json-depth" in resp.json()["error"]["message"]
        assert c.get("/health").status_code == 200
