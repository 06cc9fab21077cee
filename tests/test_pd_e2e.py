"""Prefill/decode disaggregation end to end: real radixserve prefill and decode servers
(SmolLM2, CPU) behind the real `sglang-router --pd-disaggregation`, KV pages moved by
Mooncake's TransferEngine over TCP on loopback.

Greedy outputs through the prefill/decode pair must be the ones one ordinary server
gives, and every failure must end its request with a clear error in bounded time, with
both sides' KV pools back to idle and the servers still serving.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import httpx2
import pytest

from tests.conftest import free_port
from tests.router_harness import Router, Worker, start_pd_router, start_worker

PAGE = ["--page-size", "4"]
# Short enough that the handshake test ends soon, long enough for a claim to make it
# through a loaded 2-core machine (a few seconds are not always enough there).
BOOTSTRAP_TIMEOUT_S = 20
# Long enough for a prefill queued behind a loaded CPU; no test waits it out.
WAITING_TIMEOUT_S = 120
DECODE_KV_TOKENS = 2048
# Prompts longer than the decode server's whole KV pool (but not the prefill server's).
TOO_LONG_WORDS = 2300


@dataclass
class Cluster:
    reference: Worker  # one ordinary server
    prefill: Worker
    prefill_b: Worker  # the one the crash test kills
    decode: Worker
    router: Router  # prefill + decode
    router_b: Router  # prefill_b + decode
    bootstrap_port: int
    bootstrap_port_b: int


def _prefill_args(bootstrap_port: int, *extra: str) -> list[str]:
    return ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
            str(bootstrap_port), "--disaggregation-bootstrap-timeout",
            str(BOOTSTRAP_TIMEOUT_S), *PAGE, *extra]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    port_a, port_b = free_port(), free_port()
    specs = {
        "reference": [*PAGE],
        "prefill": _prefill_args(port_a),
        # Small chunks: its long prefill is still running when it is killed.
        "prefill_b": _prefill_args(port_b, "--chunked-prefill-size", "64"),
        "decode": ["--disaggregation-mode", "decode", "--disaggregation-waiting-timeout",
                   str(WAITING_TIMEOUT_S), "--disaggregation-bootstrap-timeout",
                   str(BOOTSTRAP_TIMEOUT_S), "--max-total-tokens", str(DECODE_KV_TOKENS),
                   *PAGE],
    }
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start_worker, *args, log_name=f"pd-{name}")
                   for name, args in specs.items()}
        workers = {name: f.result() for name, f in futures.items()}
    routers: list[Router] = []
    try:
        for prefill, port in ((workers["prefill"], port_a), (workers["prefill_b"], port_b)):
            routers.append(start_pd_router([(prefill.url, port)], [workers["decode"].url],
                                           "--disable-retries"))
        yield Cluster(workers["reference"], workers["prefill"], workers["prefill_b"],
                      workers["decode"], routers[0], routers[1], port_a, port_b)
    finally:
        for r in routers:
            r.stop()
        for w in workers.values():
            w.stop()


def _prompts(n: int) -> list[str]:
    """Varied prompts, some sharing long prefixes (radix cache hits on both sides)."""
    topics = ["rivers", "the moon", "bread", "chess", "volcanoes", "owls", "trains",
              "glass", "tea", "bridges"]
    shared = ("You are a careful assistant. Answer in one short sentence, plainly, "
              "without lists or headings. ")
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        if i % 3 == 0:
            out.append(f"{shared}Tell me one fact about {topic}.")
        elif i % 3 == 1:
            out.append(f"Question {i}: why do people like {topic}? Answer:")
        else:
            out.append(f"Write the first line of a poem about {topic} number {i}:")
    return out


def _generate(url: str, prompt: str, stream: bool, max_new_tokens: int) -> dict[str, Any]:
    """/generate, greedy; a stream is read to its end and its last chunk returned."""
    body = {"text": prompt, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    with httpx2.Client(base_url=url, timeout=300) as c:
        if not stream:
            r = c.post("/generate", json=body)
            return {"status": r.status_code, **r.json()}
        last: dict[str, Any] = {}
        with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = json.loads(line[len("data: "):])
        return {"status": 200, **last}


def _wait_idle(*workers: Worker) -> None:
    for w in workers:
        w.live.wait_idle(timeout_s=60)


def test_pd_outputs_match_one_server_under_concurrent_load(cluster: Cluster) -> None:
    prompts = _prompts(100)
    jobs = [(p, i % 2 == 1, 4 + i % 5) for i, p in enumerate(prompts)]

    def run_all(url: str) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda job: _generate(url, *job), jobs))

    want = run_all(cluster.reference.url)
    got = run_all(cluster.router.url)
    for (prompt, stream, _), w, g in zip(jobs, want, got):
        assert g["status"] == 200, g
        assert g["output_ids"] == w["output_ids"], (prompt, stream)
        assert g["text"] == w["text"]
        assert g["meta_info"]["finish_reason"] == w["meta_info"]["finish_reason"]
    _wait_idle(cluster.prefill, cluster.decode)


def test_chat_completions_through_the_router_with_openai_client(cluster: Cluster) -> None:
    import openai

    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    answers = []
    for url in (cluster.reference.url, cluster.router.url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.chat.completions.create(model="default", messages=messages,
                                              max_tokens=20, temperature=0)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="default", messages=messages, max_tokens=20, temperature=0,
                stream=True)
            if chunk.choices)
        answers.append((done.choices[0].message.content, streamed,
                        done.usage.completion_tokens))
    assert answers[0][0]  # the reference said something
    assert answers[1] == answers[0]
    assert answers[1][0] == answers[1][1]  # streamed and not: the same text
    _wait_idle(cluster.prefill, cluster.decode)


def _serves_still(cluster: Cluster) -> None:
    prompt = "The three primary colours are"
    want = _generate(cluster.reference.url, prompt, False, 10)
    got = _generate(cluster.router.url, prompt, False, 10)
    assert got["status"] == 200 and got["output_ids"] == want["output_ids"]


def test_decode_server_without_kv_room_rejects(cluster: Cluster) -> None:
    prompt = " ".join(["word"] * TOO_LONG_WORDS)
    t0 = time.monotonic()
    r = httpx2.post(f"{cluster.router.url}/generate", timeout=120, json={
        "text": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    elapsed = time.monotonic() - t0
    assert r.status_code >= 400
    assert "KV cache holds only" in r.text, r.text  # the decode server's reason
    # The decode side's refusal reaches the prefill side at once: no claim wait.
    assert elapsed < BOOTSTRAP_TIMEOUT_S + 30
    _wait_idle(cluster.prefill, cluster.decode)
    _serves_still(cluster)


def test_handshake_times_out_on_both_sides(cluster: Cluster) -> None:
    """A request whose other half never comes: each side gives up after its timeout,
    answers with an error saying so, and frees what it held."""
    room = 12345
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": cluster.bootstrap_port,
              "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        # The prefill half of room, and the decode half of another room.
        prefill_only = pool.submit(httpx2.post, f"{cluster.prefill.url}/generate",
                                   timeout=120, json={"text": "Once upon a time",
                                                      "bootstrap_room": room, **fields})
        decode_only = pool.submit(httpx2.post, f"{cluster.decode.url}/generate",
                                  timeout=120, json={"text": "Once upon a time",
                                                     "bootstrap_room": room + 1, **fields})
        p, d = prefill_only.result(), decode_only.result()
    elapsed = time.monotonic() - t0
    assert p.status_code == 500 and "no decode server claimed" in p.text, p.text
    assert d.status_code == 500 and "has not received the request" in d.text, d.text
    assert elapsed < BOOTSTRAP_TIMEOUT_S + 30
    _wait_idle(cluster.prefill, cluster.decode)
    _serves_still(cluster)


def test_prefill_server_dies_while_decode_waits_for_kv(cluster: Cluster) -> None:
    # A long prefill in small chunks (but within the decode server's KV pool).
    prompt = " ".join(f"item{i}" for i in range(300))
    result: dict[str, Any] = {}

    def send() -> None:
        t0 = time.monotonic()
        try:
            result["response"] = httpx2.post(
                f"{cluster.router_b.url}/generate", timeout=120,
                json={"text": prompt, "sampling_params": {"max_new_tokens": 4}})
        except httpx2.HTTPError as exc:
            result["error"] = exc
        result["elapsed"] = time.monotonic() - t0

    sender = threading.Thread(target=send)
    sender.start()
    # Kill it once the decode side holds the request's KV, waiting for the pages.
    deadline = time.monotonic() + 60
    while cluster.decode.live.server_info()["num_waiting_reqs"] == 0:
        assert time.monotonic() < deadline, "the decode side never took the request"
        time.sleep(0.05)
    assert cluster.decode.live.server_info()["available_tokens"] < DECODE_KV_TOKENS
    cluster.prefill_b.kill()
    sender.join(timeout=60)
    assert not sender.is_alive()
    response = result.get("response")
    assert response is not None and response.status_code >= 500, result
    assert result["elapsed"] < 60
    _wait_idle(cluster.decode)
    _serves_still(cluster)
    _wait_idle(cluster.prefill, cluster.decode)


def test_unpaired_or_malformed_bootstrap_fields_are_400s(cluster: Cluster) -> None:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    paired = {"bootstrap_host": "127.0.0.1", "bootstrap_port": cluster.bootstrap_port,
              "bootstrap_room": 5}
    cases = [
        (cluster.decode, body, "bootstrap_room"),  # a PD server needs the router's fields
        (cluster.prefill, body, "bootstrap_room"),
        (cluster.reference, {**body, **paired}, "bootstrap_room"),  # an ordinary one refuses
        (cluster.decode, {**body, **paired, "bootstrap_port": 0}, "bootstrap_port"),
        (cluster.decode, {**body, **paired, "bootstrap_room": -1}, "bootstrap_room"),
        (cluster.decode, {**body, **paired, "return_logprob": True}, None),
    ]
    for worker, json_body, param in cases:
        r = httpx2.post(f"{worker.url}/generate", json=json_body, timeout=60)
        assert r.status_code == 400, (json_body, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param, r.text
    _wait_idle(cluster.prefill, cluster.decode)
