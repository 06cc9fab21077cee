"""The official openai client against the live server; greedy results equal Engine's."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import LiveServer

CHAT = [{"role": "user", "content": "Name three colors."}]
MULTIBYTE_CHAT = [{"role": "user", "content": "Say hello in Japanese"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, timeout=120)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].id


def test_completion_matches_engine(client: openai.OpenAI, engine: Any) -> None:
    got = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    want = engine.generate(PROMPT, {"max_new_tokens": 8, "temperature": 0})
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want["meta_info"]["prompt_tokens"]
    assert got.usage.completion_tokens == 8
    assert got.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_matches_engine(client: openai.OpenAI, engine: Any) -> None:
    got = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10, temperature=0)
    want = engine.generate(input_ids=engine.apply_chat_template(CHAT),
                           sampling_params={"max_new_tokens": 10, "temperature": 0})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["text"]


@pytest.mark.parametrize("messages", [CHAT, MULTIBYTE_CHAT])
def test_chat_stream_concat_equals_non_stream(client: openai.OpenAI,
                                              messages: list[dict[str, str]]) -> None:
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                          temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    if messages is MULTIBYTE_CHAT:
        assert any(ord(ch) > 0x7F for ch in text) and "\ufffd" not in text


def test_completion_stream_concat_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="m", prompt="日本の首都は", max_tokens=12,
                                     temperature=0).choices[0].text
    chunks = list(client.completions.create(model="m", prompt="日本の首都は", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full


def test_n2_sampling(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(model="m", messages=CHAT, max_tokens=6, n=2,
                                         temperature=1.0, seed=7)
    assert [c.index for c in got.choices] == [0, 1]
    assert 2 <= got.usage.completion_tokens <= 12
    stream = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=4, n=2,
                                            temperature=1.0, seed=7, stream=True))
    assert {c.choices[0].index for c in stream if c.choices} == {0, 1}


def test_stop_string_trims_output(client: openai.OpenAI) -> None:
    full = client.completions.create(model="m", prompt="1, 2, 3,", max_tokens=12,
                                     temperature=0).choices[0].text
    assert " 5," in full
    stop = " 5,"
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model="m", prompt="1, 2, 3,", max_tokens=12,
                                                    temperature=0, stop=[stop], stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.completions.create(model="m", prompt="1, 2, 3,", max_tokens=12,
                                               temperature=0, stop=stop).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == full[:full.index(stop)]
        assert reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)


def test_completion_logprobs_with_echo(client: openai.OpenAI) -> None:
    got = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=2, echo=True)
    choice = got.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    n_prompt = got.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[n_prompt:])
    assert "".join(lp.tokens) == choice.text


def test_bad_request_raises_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "x"}])
    assert err.value.body["param"] == "messages.0.role"
