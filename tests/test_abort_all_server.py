"""/abort_request with SGLang's `abort_all` field, on a server of its own: every running
request ends with an abort finish reason, the KV pool returns to idle, and bad fields
answer 400 naming the field while the server keeps serving."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import httpx2
import pytest

from tests.conftest import API_KEY, LiveServer, start_server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = start_server("--api-key", API_KEY, log_name="abort-all")
    yield server
    server.proc.kill()
    server.proc.wait(timeout=30)


def test_abort_all_aborts_every_running_request(live: LiveServer) -> None:
    async def run() -> list[dict[str, Any]]:
        async with httpx2.AsyncClient(base_url=live.url, headers=live.headers,
                                      timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/generate", json={
                "text": f"{PROMPT} {i}", "rid": f"long-{i}",
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}))
                for i in range(3)]
            await asyncio.sleep(1.5)
            resp = await c.post("/abort_request", json={"abort_all": True})
            assert resp.status_code == 200, resp.text
            return [(await t).json() for t in tasks]

    got = asyncio.run(run())
    assert [g["meta_info"]["finish_reason"]["type"] for g in got] == ["abort"] * 3
    assert all(g["meta_info"]["completion_tokens"] < 2000 for g in got)
    live.wait_idle()


@pytest.mark.parametrize("body,field", [
    ({"abort_all": "yes"}, "abort_all"),
    ({"abort_all": 1}, "abort_all"),
    ({"rid": 5}, "rid"),
    ({}, "rid"),
    ([1, 2], "rid"),
])
def test_abort_request_bad_fields(live: LiveServer, body: Any, field: str) -> None:
    with live.client() as c:
        resp = c.post("/abort_request", json=body)
        assert resp.status_code == 400, resp.text
        assert field in resp.text
        ok = c.post("/generate", json={"text": PROMPT, "sampling_params": {
            "max_new_tokens": 2, "temperature": 0}})
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2
    live.wait_idle()


def test_abort_all_with_nothing_running(live: LiveServer) -> None:
    with live.client() as c:
        assert c.post("/abort_request", json={"abort_all": True}).status_code == 200
    live.wait_idle()
