"""One set of request rules (managers/request_validation.py) on every path: the same bad
request gives the same error from the RequestValidator, the offline Engine (ValueError)
and the HTTP server (400 naming the same param); the model's generation defaults apply
on both the offline and the HTTP path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.managers.request_validation import (MAX_TOP_LOGPROBS, InvalidRequestError,
                                                    ModelLimits, RequestValidator, limits_from)
from tests.conftest import LiveServer, start_server
from tests.model_factory import make_tiny_checkpoint

LIMITS = ModelLimits(context_len=64, vocab_size=1000, max_total_num_tokens=48,
                     generation_defaults={"temperature": 0.0, "top_k": 1})


def _validator(**overrides: Any) -> RequestValidator:
    fields = {"context_len": 64, "vocab_size": 1000, "max_total_num_tokens": 48,
              "generation_defaults": {}, **overrides}
    return RequestValidator(ModelLimits(**fields))


def _error(fn: Any, *args: Any, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


# --- the validator alone -------------------------------------------------------------

def test_prompt_rules() -> None:
    v = _validator()
    assert _error(v.build, [(None, [])]).param == "prompt"
    e = _error(v.build, [(None, [1, 1000])])
    assert e.param == "input_ids" and "outside [0, 1000)" in e.message
    e = _error(v.build, [(None, [1] * 64)])
    assert e.param == "prompt" and "context length" in e.message
    e = _error(v.build, [(None, [1] * 48)])  # fits the context, not the KV cache
    assert e.param == "prompt" and "--max-total-tokens" in e.message
    assert len(v.build([(None, [1] * 47)], {"max_new_tokens": 1})) == 1


def test_max_new_tokens_budget() -> None:
    v = _validator(max_total_num_tokens=10_000)
    (req,) = v.build([(None, [1] * 60)])  # missing: the default (128), clipped to the room
    assert req.sampling_params.max_new_tokens == 4
    assert v.build([(None, [1] * 10)], {})[0].sampling_params.max_new_tokens == 54
    (req,) = v.build([(None, [1] * 10)], {"max_new_tokens": None})  # null: the room
    assert req.sampling_params.max_new_tokens == 54
    e = _error(v.build, [(None, [1] * 10)], {"max_new_tokens": 55})
    assert e.param == "max_new_tokens"
    assert v.build([(None, [1] * 10)], {"max_new_tokens": 54})[0].sampling_params \
        .max_new_tokens == 54


def test_logprob_rules() -> None:
    v = _validator()
    e = _error(v.build, [(None, [1, 2])], top_logprobs_num=MAX_TOP_LOGPROBS + 1)
    assert e.param == "top_logprobs_num"
    assert _error(v.build, [(None, [1, 2])], top_logprobs_num=-1).param == "top_logprobs_num"
    e = _error(v.build, [(None, [1, 2])], return_logprob=True, logprob_start_len=2)
    assert e.param == "logprob_start_len"
    (req,) = v.build([(None, [1, 2])], return_logprob=True, logprob_start_len=1,
                     top_logprobs_num=MAX_TOP_LOGPROBS)
    assert req.logprob_start_len == 1 and req.top_logprobs_num == MAX_TOP_LOGPROBS
    (req,) = v.build([(None, [1, 2])], logprob_start_len=5)  # ignored without logprobs
    assert req.logprob_start_len == -1


def test_sampling_params_rules_name_the_field() -> None:
    v = _validator()
    assert _error(v.build, [(None, [1])], {"top_p": 0}).param == "top_p"
    assert _error(v.build, [(None, [1])], {"bogus": 1}).param == "sampling_params"
    assert _error(v.build, [(None, [1])], "hot").param == "sampling_params"


def test_generation_defaults_apply_under_the_request() -> None:
    v = RequestValidator(LIMITS)
    (req,) = v.build([(None, [1])])
    assert req.sampling_params.is_greedy
    (req,) = v.build([(None, [1])], {"temperature": 0.7, "top_k": 5})
    assert req.sampling_params.temperature == 0.7 and req.sampling_params.top_k == 5
    (req,) = v.build([(None, [1])], {"temperature": None})  # null: not given
    assert req.sampling_params.is_greedy


def test_n_expansion_rids_and_seeds() -> None:
    v = _validator()
    reqs = v.build([("a", [1]), (None, [2, 3])], {"n": 2, "seed": 10, "max_new_tokens": 4},
                   rid="base")
    assert [r.rid for r in reqs] == ["base-0", "base-1", "base-2", "base-3"]
    assert [r.sampling_params.seed for r in reqs] == [10, 11, 10, 11]
    assert all(r.sampling_params.n == 1 for r in reqs)
    assert [r.input_text for r in reqs] == ["a", "a", None, None]
    (one,) = v.build([(None, [1])], rid="solo")
    assert one.rid == "solo"
    reqs = v.build([(None, [1]), (None, [2])], [{"max_new_tokens": 1}, {"max_new_tokens": 2}])
    assert [r.sampling_params.max_new_tokens for r in reqs] == [1, 2]
    assert _error(v.build, [(None, [1])], [{}, {}]).param == "sampling_params"


def test_prepare_shapes() -> None:
    v = _validator()
    assert _error(v.prepare, None, None, None).param == "text"
    assert _error(v.prepare, "hi", [1], None).param == "text"
    assert _error(v.prepare, [], None, None).param == "text"
    assert _error(v.prepare, "hi", None, None).param == "text"  # no tokenizer
    assert _error(v.prepare, None, [1, "x"], None).param == "input_ids"
    reqs, single = v.prepare(None, [[1], [2]], None)
    assert not single and len(reqs) == 2
    reqs, single = v.prepare(None, [1, 2], None)
    assert single and reqs[0].input_ids == [1, 2]


def test_check_tokenized() -> None:
    v = _validator()
    ok = TokenizedGenerateReqInput("r", None, [1, 2], SamplingParams())
    v.check_tokenized(ok)
    for ids, param in (([], "prompt"), ([5000], "input_ids"), ([1] * 64, "prompt"),
                       ([1] * 48, "prompt")):
        bad = TokenizedGenerateReqInput("r", None, ids, SamplingParams())
        assert _error(v.check_tokenized, bad).param == param


def test_limits_round_trip() -> None:
    assert ModelLimits.from_model_info(LIMITS.to_model_info()) == LIMITS

    class FakeScheduler:
        class model_config:  # noqa: N801
            context_len, vocab_size = 64, 1000
            eos_token_ids = {2}
            generation_defaults = {"top_p": 0.9}
            pooling = None  # a generating model
        max_total_num_tokens = 48

    limits = limits_from(FakeScheduler.model_config, FakeScheduler.max_total_num_tokens)
    assert limits.eos_token_ids == (2,) and limits.generation_defaults == {"top_p": 0.9}


# --- the same error on every path (the session's server and engine: SmolLM2) ------------

# (the /generate body, the Engine's generate kwargs, the param both name)
SAME_ERROR = [
    ({"text": ""}, {"prompt": ""}, "prompt"),
    ({"input_ids": [1, 10**7]}, {"input_ids": [1, 10**7]}, "input_ids"),
    ({"input_ids": [5] * 9000}, {"input_ids": [5] * 9000}, "prompt"),
    ({"text": "hi", "return_logprob": True, "top_logprobs_num": 21},
     {"prompt": "hi", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 2},
     {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 2},
     "logprob_start_len"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 10**7}},
     {"prompt": "hi", "sampling_params": {"max_new_tokens": 10**7}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"temprature": 1}},
     {"prompt": "hi", "sampling_params": {"temprature": 1}}, "sampling_params"),
    ({"text": "hi", "sampling_params": {"top_k": 0}},
     {"prompt": "hi", "sampling_params": {"top_k": 0}}, "top_k"),
]


@pytest.mark.parametrize("body,kwargs,param", SAME_ERROR)
def test_same_error_on_every_path(server: LiveServer, engine: Any, body: dict,
                                  kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError) as offline:
        engine.generate(**kwargs)
    assert isinstance(offline.value, InvalidRequestError) and offline.value.param == param
    direct = _error(engine.validator.prepare, kwargs.get("prompt"), kwargs.get("input_ids"),
                    engine.tokenizer, kwargs.get("sampling_params"),
                    return_logprob=kwargs.get("return_logprob", False),
                    logprob_start_len=kwargs.get("logprob_start_len"),
                    top_logprobs_num=kwargs.get("top_logprobs_num"))
    assert (direct.param, direct.message) == (param, offline.value.message)
    with server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    # The server's limits equal the engine's (same model) except the KV cache size.
    if "KV cache" not in error["message"]:
        assert error["message"] == offline.value.message


def test_server_reports_the_limits(server: LiveServer, engine: Any) -> None:
    info = server.server_info()["model_info"]
    assert info["context_len"] == engine.limits.context_len
    assert info["vocab_size"] == engine.limits.vocab_size
    assert info["generation_defaults"] == engine.limits.generation_defaults


# --- generation defaults on both paths (a tiny checkpoint with generation_config.json) --

@pytest.fixture(scope="module")
def greedy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("greedy-default"))
    (path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_k": 1, "eos_token_id": 2}))
    return str(path)


@pytest.fixture(scope="module")
def greedy_server(greedy_checkpoint: str) -> Any:
    live = start_server("--model-path", greedy_checkpoint, "--max-total-tokens", "2048",
                        "--api-key", "k", log_name="greedy-default")
    live.api_key = "k"
    yield live
    live.proc.terminate()
    live.proc.wait(timeout=30)


def test_generation_defaults_on_both_paths(greedy_checkpoint: str, greedy_server: LiveServer
                                           ) -> None:
    from radixserve.engine import Engine

    prompt, budget = "The capital of France is", {"max_new_tokens": 8, "ignore_eos": True}
    with Engine(model_path=greedy_checkpoint, max_total_tokens=2048) as eng:
        assert eng.limits.generation_defaults == {"temperature": 0.0, "top_k": 1}
        greedy = eng.generate(prompt, {**budget, "temperature": 0})["output_ids"]
        offline = eng.generate(prompt, budget)["output_ids"]
        sampled = eng.generate(prompt, {**budget, "temperature": 1.0, "top_k": -1,
                                        "seed": 3})["output_ids"]
    with greedy_server.client() as c:
        http = c.post("/generate", json={"text": prompt, "sampling_params": budget})
        chat = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                               "ignore_eos": True})
    assert http.status_code == 200, http.text
    assert offline == greedy and http.json()["output_ids"] == greedy
    # The OpenAI endpoints send only the sampling fields the client set: defaults apply.
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["text"] == http.json()["text"]
    assert sampled != greedy  # the request's own values win over the model's
