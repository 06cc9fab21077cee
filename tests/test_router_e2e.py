"""Two ordinary radixserve workers (real SmolLM2, CPU) behind the real `sglang-router`
binary: registration and health checking, greedy outputs through the router equal to a
worker's own for the native and the OpenAI APIs (the official client, streamed and not),
cache-aware routing keeping prefix groups on one worker with a higher cache hit rate
than round robin, and a worker killed behind the router (bounded failure, the router
moving over, the survivor's KV pool back to idle).

The worker-killing test is the last one: it takes one of the module's workers down.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx2
import openai
import pytest

from tests.conftest import API_KEY
from tests.router_harness import Router, Worker, start_router, start_worker

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    args = ("--api-key", API_KEY, "--enable-metrics")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_worker, *args, log_name=f"router-worker{i}")
                   for i in range(2)]
        started: list[Worker] = []
        try:
            for f in futures:
                started.append(f.result())
        except BaseException:
            for f in futures:
                if f.done() and f.exception() is None and f.result() not in started:
                    started.append(f.result())
            for w in started:
                w.stop()
            raise
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def router(workers: list[Worker]) -> Iterator[Router]:
    r = start_router([w.url for w in workers], "cache_aware", api_key=API_KEY)
    yield r
    r.stop()


def _generate(client: httpx2.Client, text: str, params: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/generate", json={"text": text, "sampling_params": params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _sse(resp: httpx2.Response) -> list[Any]:
    events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# --- registration and health ------------------------------------------------------

def test_router_registers_both_workers_healthy(router: Router, workers: list[Worker]) -> None:
    with workers[0].live.client() as c:
        model_id = c.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        info = c.get("/server_info").raise_for_status().json()
    assert info["served_model_name"] == model_id and info["version"]
    # The router's health checks carry no API key: both health routes let them in, as
    # SGLang's workers do; everything else still needs the key.
    for path in ("/health", "/health_generate"):
        assert httpx2.get(f"{workers[0].url}{path}", timeout=60).status_code == 200
    assert httpx2.get(f"{workers[0].url}/server_info").status_code == 401
    listed = {w["url"]: w for w in router.workers()}
    assert set(listed) == {w.url for w in workers}
    for w in listed.values():
        assert w["is_healthy"] and w["worker_type"] == "regular"
        assert w["model_id"] == model_id  # from /server_info's served_model_name
    with router.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [model_id]


def test_router_fans_out_flush_cache_and_metrics(router: Router, workers: list[Worker]) -> None:
    with router.client() as c:
        _generate(c, PROMPTS[0], {"max_new_tokens": 4, "temperature": 0})
        assert sum(w.live.wait_idle()["evictable_tokens"] for w in workers) > 0
        flushed = c.post("/flush_cache")
        assert flushed.status_code == 200, flushed.text
        assert flushed.json()["status"] == "success", flushed.text
        assert flushed.json()["workers_flushed"] == 2, flushed.text
        assert [w.live.wait_idle()["evictable_tokens"] for w in workers] == [0, 0]
        # /engine_metrics: every worker's /metrics, each sample labelled with its worker.
        metrics = c.get("/engine_metrics")
        assert metrics.status_code == 200, metrics.text
    for w in workers:
        assert f'worker_addr="{w.url}"' in metrics.text
    assert "radixserve" in metrics.text


def test_health_checker_keeps_workers_healthy_and_add_worker(workers: list[Worker]) -> None:
    """A router with a 1 s health check interval over worker 0 only: after several checks
    it still holds it healthy (the checks are unauthenticated GET /health); worker 1 joins
    through the router's POST /workers (metadata from its /server_info and /model_info)
    and then serves requests."""
    r = start_router([workers[0].url], "round_robin", "--health-check-interval-secs", "1",
                     api_key=API_KEY)
    try:
        time.sleep(3.5)
        assert [w["is_healthy"] for w in r.workers()] == [True]
        with r.client() as c:
            resp = c.post("/workers", json={"url": workers[1].url, "api_key": API_KEY})
            assert resp.status_code in (200, 202), resp.text
        deadline = time.monotonic() + 60
        while sum(w["is_healthy"] for w in r.workers()) < 2:
            assert time.monotonic() < deadline, r.workers()
            time.sleep(0.3)
        before = [_server_info(w)["num_requests_total"] for w in workers]
        with r.client() as c:
            for _ in range(4):  # round robin: two each
                _generate(c, PROMPTS[0], {"max_new_tokens": 1, "temperature": 0})
        after = [_server_info(w)["num_requests_total"] for w in workers]
        assert [a - b for a, b in zip(after, before)] == [2, 2]
    finally:
        r.stop()


# --- same greedy output through the router ---------------------------------------

def test_generate_through_router_matches_worker(router: Router, workers: list[Worker]) -> None:
    with workers[0].live.client() as direct, router.client() as routed:
        for text in PROMPTS:
            want = _generate(direct, text, GREEDY)
            got = _generate(routed, text, GREEDY)
            assert (got["text"], got["output_ids"]) == (want["text"], want["output_ids"])
            assert got["meta_info"]["completion_tokens"] == 12
            with routed.stream("POST", "/generate", json={
                    "text": text, "sampling_params": GREEDY, "stream": True}) as resp:
                assert resp.status_code == 200
                chunks = _sse(resp)
            assert chunks[-1]["text"] == want["text"]  # streamed chunks are cumulative
            assert chunks[-1]["output_ids"] == want["output_ids"]


def test_openai_client_through_router_matches_worker(router: Router,
                                                     workers: list[Worker]) -> None:
    direct = openai.OpenAI(base_url=f"{workers[0].url}/v1", api_key=API_KEY, timeout=120)
    routed = openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, timeout=120)
    model = direct.models.list().data[0].id
    for prompt in PROMPTS[:2]:
        want = direct.completions.create(model=model, prompt=prompt, max_tokens=10,
                                         temperature=0)
        got = routed.completions.create(model=model, prompt=prompt, max_tokens=10,
                                        temperature=0)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage.completion_tokens == 10
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        stream = routed.completions.create(model=model, prompt=prompt, max_tokens=10,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) \
            == want.choices[0].text

    want = direct.chat.completions.create(model=model, messages=CHAT, max_tokens=10,
                                          temperature=0)
    got = routed.chat.completions.create(model=model, messages=CHAT, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.completion_tokens == 10 and got.choices[0].finish_reason == "length"
    stream = routed.chat.completions.create(model=model, messages=CHAT, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == want.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


# --- cache-aware routing ------------------------------------------------------------

GROUP_HEADS = ["Alpha station log", "Bravo harbour ledger", "Charlie mountain survey"]
PER_GROUP = 5


def _group_prefix(head: str) -> str:
    # A long shared document per group: the part the radix cache can reuse.
    lines = [f"{head}, entry {i}: the {head.split()[1]} reading was {i * 7 % 13} units."
             for i in range(12)]
    return " ".join(lines)


def _text(g: int, j: int) -> str:
    return f"{_group_prefix(GROUP_HEADS[g])} Question {j}: what was reading {j}?"


def _server_info(w: Worker) -> dict[str, Any]:
    return w.live.server_info()


def _flush(workers: list[Worker]) -> None:
    for w in workers:
        w.live.wait_idle()
        with w.live.client() as c:
            assert c.post("/flush_cache").status_code == 200


def _generate_once(r: Router, text: str, params: dict[str, Any]) -> dict[str, Any]:
    with r.client() as c:
        return _generate(c, text, params)


def _route_all(r: Router, workers: list[Worker]
               ) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], Any], list[float]]:
    """Send the request set through `r`. Wave 0 (the first request of every group) goes
    at once and generates a little longer, so that the router sees load on the worker
    it chose first; the later waves go one request at a time, so that the workers' own
    request counters tell which worker served each. Returns that worker per (group,
    request) of the later waves, every response's meta_info, and each worker's cache
    hit rate (cached / prompt tokens, from its counters)."""
    _flush(workers)
    start = [_server_info(w) for w in workers]
    meta: dict[tuple[int, int], Any] = {}
    with ThreadPoolExecutor(len(GROUP_HEADS)) as pool:
        wave0 = pool.map(lambda g: _generate_once(r, _text(g, 0), {
            "max_new_tokens": 24, "ignore_eos": True, "temperature": 0}),
            range(len(GROUP_HEADS)))
        for g, out in enumerate(wave0):
            meta[g, 0] = out["meta_info"]
    served: dict[tuple[int, int], int] = {}
    for j in range(1, PER_GROUP):
        for g in range(len(GROUP_HEADS)):
            before = [_server_info(w)["num_requests_total"] for w in workers]
            out = _generate_once(r, _text(g, j), {"max_new_tokens": 1, "temperature": 0})
            after = [_server_info(w)["num_requests_total"] for w in workers]
            deltas = [a - b for a, b in zip(after, before)]
            assert sorted(deltas) == [0, 1], deltas
            served[g, j] = deltas.index(1)
            meta[g, j] = out["meta_info"]
    end = [_server_info(w) for w in workers]
    per_worker = [(e["cached_tokens_total"] - s["cached_tokens_total"])
                  / max(e["prompt_tokens_total"] - s["prompt_tokens_total"], 1)
                  for s, e in zip(start, end)]
    return served, meta, per_worker


def test_cache_aware_beats_round_robin_on_shared_prefixes(workers: list[Worker]) -> None:
    groups = range(len(GROUP_HEADS))
    rates = {}
    for policy in ("cache_aware", "round_robin"):
        r = start_router([w.url for w in workers], policy, api_key=API_KEY)
        try:
            served, meta, per_worker = _route_all(r, workers)
        finally:
            r.stop()
        rates[policy] = (sum(m["cached_tokens"] for m in meta.values())
                         / sum(m["prompt_tokens"] for m in meta.values()))
        by_group = [{served[g, j] for j in range(1, PER_GROUP)} for g in groups]
        print(f"{policy}: workers per group {by_group}, hit rate {rates[policy]:.3f}, "
              f"per worker {[round(x, 3) for x in per_worker]}")
        if policy == "cache_aware":
            # Each group stays on one worker: the one its first request went to (the
            # second request finds most of its prompt cached, and only the group's own
            # first request shares that prefix), and the groups spread over both.
            assert all(len(ws) == 1 for ws in by_group), by_group
            assert all(meta[g, 1]["cached_tokens"] > meta[g, 1]["prompt_tokens"] // 2
                       for g in groups), meta
            assert set().union(*by_group) == {0, 1}, by_group
        else:
            assert all(len(ws) == 2 for ws in by_group), by_group
    # cache_aware misses once per group, round robin once per group and worker.
    assert rates["cache_aware"] > rates["round_robin"] + 0.1, rates


# --- a worker dies behind the router (keep last: it kills a module worker) ---------

def test_killed_worker_fails_bounded_and_router_moves_over(workers: list[Worker]) -> None:
    r = start_router([w.url for w in workers], "cache_aware",
                     "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
                     api_key=API_KEY)
    try:
        _kill_during_stream(r, workers)
    finally:
        r.stop()


def _kill_during_stream(r: Router, workers: list[Worker]) -> None:
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def long_stream() -> None:
        try:
            with httpx2.Client(base_url=r.url, headers=r.headers, timeout=60) as c, \
                    c.stream("POST", "/generate", json={
                        "text": "Write a very long story about the sea.", "stream": True,
                        "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True,
                                            "temperature": 0}}) as resp:
                outcome["status"] = resp.status_code
                outcome["lines"] = lines = []
                for line in resp.iter_lines():
                    lines.append(line)
                    started.set()
        except httpx2.HTTPError as exc:
            outcome["error"] = repr(exc)
        finally:
            outcome["ended_at"] = time.monotonic()
            started.set()

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    assert started.wait(120), "the long stream never started"
    running = [_server_info(w)["num_running_reqs"] for w in workers]
    victim_index = running.index(1)
    victim, survivor = workers[victim_index], workers[1 - victim_index]
    killed_at = time.monotonic()
    victim.kill()
    thread.join(60)
    assert not thread.is_alive(), "the stream through the router hung after the kill"
    # It ended soon after the kill, and not as a full, normal answer.
    assert outcome["ended_at"] - killed_at < 30, outcome
    data = [ln for ln in outcome.get("lines", []) if ln.startswith("data: {")]
    finished = [json.loads(ln[6:]) for ln in data[-1:]]
    print(f"stream after the kill: status {outcome.get('status')}, error "
          f"{outcome.get('error')}, {len(data)} chunks, last lines "
          f"{[ln[:80] for ln in outcome.get('lines', [])[-2:]]}")
    assert "error" in outcome or not finished or \
        finished[0].get("meta_info", {}).get("completion_tokens", 0) < 4000, outcome

    # Requests right after the kill: each answers within a bound, either served (by the
    # survivor, with its greedy output) or refused with an error body.
    with survivor.live.client() as direct:
        want = {p: _generate(direct, p, GREEDY)["text"] for p in PROMPTS}
    with httpx2.Client(base_url=r.url, headers=r.headers, timeout=60) as c:
        for p in PROMPTS * 2:
            t0 = time.monotonic()
            resp = c.post("/generate", json={"text": p, "sampling_params": GREEDY})
            assert time.monotonic() - t0 < 60
            print(f"after the kill: {resp.status_code} {resp.text[:120]!r}")
            if resp.status_code == 200:
                assert resp.json()["text"] == want[p]
            else:
                assert resp.status_code >= 500 and resp.text, (resp.status_code, resp.text)
        # The health checker marks the dead worker unhealthy; then everything is served.
        deadline = time.monotonic() + 30
        while True:
            state = {w["url"]: w["is_healthy"] for w in r.workers()}
            if state.get(victim.url) is False or victim.url not in state:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state.get(survivor.url) is True, state
        for p in PROMPTS:
            resp = c.post("/generate", json={"text": p, "sampling_params": GREEDY})
            assert resp.status_code == 200, resp.text
            assert resp.json()["text"] == want[p]
    survivor.live.wait_idle()
