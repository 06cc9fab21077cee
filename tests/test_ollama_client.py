"""The official `ollama` Python client against radixserve's Ollama-compatible API, with
the real SmolLM2: generate and chat, streamed and not, equal to the same greedy
request on the OpenAI endpoints; format="json"; tags, show, version; bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import LiveServer

ollama = pytest.importorskip("ollama", reason="the ollama client is not installed")

OPTIONS = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Any:
    return ollama.Client(host=server.url, headers=server.headers)


def _openai_chat(server: LiveServer, messages: list[dict[str, str]], max_tokens: int) -> str:
    with server.client() as c:
        body = c.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": max_tokens, "temperature": 0}).json()
    return body["choices"][0]["message"]["content"]


def test_generate_and_stream(server: LiveServer, client: Any) -> None:
    prompt = "What is the capital of France?"
    out = client.generate(model="smollm2", prompt=prompt, options=OPTIONS)
    # Ollama applies the model's template to the prompt, as a one-message chat.
    assert out.response == _openai_chat(server, [{"role": "user", "content": prompt}], 16)
    assert out.done and out.done_reason in ("stop", "length")
    assert out.eval_count > 0 and out.prompt_eval_count > 0
    parts = list(client.generate(model="smollm2", prompt=prompt, options=OPTIONS,
                                 stream=True))
    assert "".join(p.response for p in parts) == out.response
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and len(parts) > 2
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    with server.client() as c:
        want = c.post("/generate", json={"text": "The capital of France is", "sampling_params": {
            "temperature": 0, "max_new_tokens": 4}}).json()
    assert raw.response == want["text"] and raw.eval_count == 4
    assert raw.done_reason == "length"


def test_chat_and_stream(server: LiveServer, client: Any) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi"}]
    out = client.chat(model="smollm2", messages=messages, options=OPTIONS)
    assert out.message.role == "assistant"
    assert out.message.content == _openai_chat(server, messages, 16) and out.message.content
    parts = list(client.chat(model="smollm2", messages=messages, options=OPTIONS,
                             stream=True))
    assert "".join(p.message.content for p in parts) == out.message.content
    assert parts[-1].done


def test_format_json(client: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"]}
    out = client.chat(model="smollm2", format=schema,
                      messages=[{"role": "user", "content": "Name a city as JSON."}],
                      options={"temperature": 0, "num_predict": 32})
    assert isinstance(json.loads(out.message.content)["city"], str)


def test_tags_show_version(server: LiveServer, client: Any) -> None:
    models = client.list().models
    assert len(models) == 1 and models[0].model
    show = client.show(models[0].model)
    assert show.modelinfo["context_length"] > 0 and "im_start" in show.template
    assert show.modelinfo["general.architecture"] == "LlamaForCausalLM"
    with server.client() as c:
        assert c.get("/api/version").json()["version"]
        bad = c.post("/api/generate", json={"model": "m", "prompt": "x", "format": "yaml"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
        assert c.post("/api/show", json={}).json()["error"]["param"] == "model"


@pytest.mark.parametrize("call,param", [
    (lambda c: c.chat(model="m", messages=[]), "messages"),
    (lambda c: c.chat(model="m", messages=[{"role": "user", "content": "x"}],
                      options={"temperature": -1}), "temperature"),
    (lambda c: c.generate(model="m", prompt="x", options={"top_p": 5}), "top_p"),
    (lambda c: c.generate(model="m", prompt="x", template="{{ .Prompt }}"), "template"),
])
def test_bad_input(server: LiveServer, client: Any, call: Any, param: str) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        call(client)
    assert err.value.status_code == 400 and param in str(err.value.error)
    with server.client() as c:
        assert c.get("/health").status_code == 200
