"""Requests that used to crash a server process, stall it, or be answered wrongly are
refused with 400 naming the field, by the one validation path (request_validation.py),
and the server keeps serving. (Part of the hardening issue: the fields below.)"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.managers.request_validation import (MAX_N, InvalidRequestError, ModelLimits,
                                                    RequestValidator)
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
    # logit_bias was accepted and silently ignored.
    ("/v1/chat/completions", {"model": "default", "logit_bias": {"42": 100},
                              "messages": [{"role": "user", "content": "Hi"}]}, "logit_bias"),
    ("/v1/completions", {"model": "default", "prompt": "Hi", "logit_bias": {"42": -100}},
     "logit_bias"),
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
