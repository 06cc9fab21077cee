"""The native API, errors, auth, concurrency and disconnects against the live server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest

from tests.conftest import LiveServer

PROMPT = "The capital of France is"


def _sse(lines: list[str]) -> list[Any]:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_and_info(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health_generate").status_code == 200
        info = c.get("/get_model_info").json()
        assert info["context_length"] > 0 and info["is_generation"]
        assert "api_key" not in c.get("/get_server_info").json()
        assert c.post("/flush_cache").status_code in (200, 400)
    server.wait_idle()


def test_generate_matches_engine(server: LiveServer, engine: Any) -> None:
    params = {"max_new_tokens": 8, "temperature": 0}
    with server.client() as c:
        got = c.post("/generate", json={"text": PROMPT, "sampling_params": params}).json()
    want = engine.generate(PROMPT, params)
    assert got["text"] == want["text"] and got["output_ids"] == want["output_ids"]
    meta = got["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == want["meta_info"]["prompt_tokens"]
    assert meta["completion_tokens"] == 8 and "cached_tokens" in meta


def test_generate_stream_input_ids_and_logprobs(server: LiveServer) -> None:
    body = {"input_ids": [504, 3575, 282, 4649, 314], "return_logprob": True,
            "top_logprobs_num": 2, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    with server.client() as c:
        full = c.post("/generate", json=body).json()
        with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
            chunks = _sse(list(r.iter_lines()))
    assert chunks[-1]["text"] == full["text"]
    meta = full["meta_info"]
    assert len(meta["output_token_logprobs"]) == 6 and len(meta["output_top_logprobs"]) == 6
    assert len(meta["input_token_logprobs"]) == 5 and meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["output_token_logprobs"]] == full["output_ids"]


def test_generate_batch_and_n(server: LiveServer) -> None:
    with server.client() as c:
        got = c.post("/generate", json={"text": [PROMPT, "Hello"], "sampling_params": {
            "max_new_tokens": 3, "n": 2, "temperature": 0.8, "seed": 1}}).json()
    assert len(got) == 4 and all(g["meta_info"]["completion_tokens"] == 3 for g in got)


def test_abort_request(server: LiveServer) -> None:
    async def run() -> dict[str, Any]:
        async with httpx2.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=120) as c:
            task = asyncio.create_task(c.post("/generate", json={
                "text": PROMPT, "rid": "to-abort",
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
            await asyncio.sleep(1.0)
            await c.post("/abort_request", json={"rid": "to-abort"})
            return (await task).json()

    got = asyncio.run(run())
    assert got["meta_info"]["finish_reason"]["type"] == "abort"
    server.wait_idle()


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_INPUTS = [
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "wizard", "content": "x"}]},
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 10**7}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "n": 0}, "n"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x " * 9000}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**7}, "max_tokens"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, "sampling_params"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
    ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 50},
     "top_logprobs_num"),
    ("/generate", {"sampling_params": {}}, "text"),
]


@pytest.mark.parametrize("path,body,param", BAD_INPUTS)
def test_bad_input_is_400_naming_the_field(server: LiveServer, path: str, body: Any,
                                           param: str) -> None:
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_server_keeps_serving(server: LiveServer) -> None:
    with server.client() as c:
        r = c.post("/v1/completions", content=b'{"prompt": "hi", ',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_auth_enforced(server: LiveServer) -> None:
    assert httpx2.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx2.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx2.post(f"{server.url}/generate", headers=headers,
                          json={"text": "hi"}).status_code == 401


async def _stream_completion(c: httpx2.AsyncClient, i: int) -> tuple[str, str | None]:
    body = {"prompt": f"Request {i}: count to ten.", "max_tokens": 4, "stream": True,
            "temperature": 0}
    text, reason = "", None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


def test_200_concurrent_streams(server: LiveServer) -> None:
    async def run() -> list[tuple[str, str | None]]:
        limits = httpx2.Limits(max_connections=200)
        async with httpx2.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=300, limits=limits) as c:
            return await asyncio.gather(*(_stream_completion(c, i) for i in range(200)))

    results = asyncio.run(run())
    assert len(results) == 200 and all(reason in ("length", "stop") for _, reason in results)
    server.wait_idle()


def test_disconnects_free_kv(server: LiveServer) -> None:
    async def leave_early(c: httpx2.AsyncClient, i: int) -> None:
        body = {"prompt": f"Client {i} writes a long story:", "max_tokens": 500,
                "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # first token arrived: hang up mid-stream

    async def run() -> None:
        async with httpx2.AsyncClient(base_url=server.url, headers=server.headers, timeout=300,
                                     limits=httpx2.Limits(max_connections=50)) as c:
            await asyncio.gather(*(leave_early(c, i) for i in range(50)))

    asyncio.run(run())
    info = server.wait_idle(timeout_s=90)
    assert info["protected_tokens"] == 0
    with server.client() as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
