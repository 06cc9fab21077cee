"""--enable-metrics, the batch log lines and --log-requests, against a live server on a
tiny random checkpoint: the counters move by exactly what a scripted sequence of
requests implies, every histogram counts every request, the gauges fall back to 0 when
the server is idle, and the log lines carry the same numbers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer, start_server
from tests.model_factory import make_tiny_checkpoint

PREFIX = "radixserve"
MAX_TOTAL_TOKENS = 4096
DECODE_LOG_INTERVAL = 4
# Token ids below the tiny model's vocabulary, none of them its EOS (2).
PROMPT_A = list(range(100, 140))  # 40 tokens
PROMPT_B = list(range(300, 320))  # 20 tokens
# (prompt, max_new_tokens) sent one after the other: the second A finds the first A's
# prompt in the radix cache.
SCRIPT = [(PROMPT_A, 5), (PROMPT_A, 5), (PROMPT_B, 7)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("metrics-llama"))


@pytest.fixture(scope="module")
def metrics_server(checkpoint: Path) -> Iterator[tuple[LiveServer, Path]]:
    live = start_server("--model-path", str(checkpoint), "--max-total-tokens",
                        str(MAX_TOTAL_TOKENS), "--enable-metrics", "--log-level", "info",
                        "--decode-log-interval", str(DECODE_LOG_INTERVAL), "--log-requests",
                        "--log-requests-level", "1", "--api-key", "k", log_name="metrics")
    live.api_key = "k"
    port = live.url.rsplit(":", 1)[1]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"radixserve-test-metrics-{port}.log"
    yield live, log
    live.proc.terminate()
    assert live.proc.wait(timeout=30) == 0


def scrape(live: LiveServer) -> dict[str, float]:
    """Every sample of /metrics (parsed by prometheus_client), by name and `le`."""
    with live.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = s.name + (f"[{s.labels['le']}]" if "le" in s.labels else "")
            assert key not in out, f"{key} reported twice: {s.labels}"
            out[key] = s.value
    return out


def metric(samples: dict[str, float], name: str) -> float:
    return samples.get(f"{PREFIX}:{name}", 0.0)


def generate(live: LiveServer, prompt: list[int], n: int) -> dict[str, Any]:
    """Streamed, so that every token reaches the API server as it is made (a request
    that does not stream is answered in one message, and so has no inter-token gaps)."""
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": n, "ignore_eos": True, "temperature": 0}}
    with live.client() as c, c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    return chunks[-1]


def wait_gauges_idle(live: LiveServer) -> dict[str, float]:
    live.wait_idle()
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(live)
        if (metric(samples, "num_running_reqs") == 0 and metric(samples, "num_queue_reqs") == 0
                or time.monotonic() > deadline):
            return samples
        time.sleep(0.1)


def read_log(log: Path, pattern: str) -> list[re.Match]:
    return list(re.finditer(pattern, log.read_text()))


def test_scripted_requests_move_metrics_and_logs_exactly(
        metrics_server: tuple[LiveServer, Path]) -> None:
    live, log = metrics_server
    before = scrape(live)
    results = [generate(live, prompt, n) for prompt, n in SCRIPT]
    after = wait_gauges_idle(live)

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    metas = [r["meta_info"] for r in results]
    assert [m["completion_tokens"] for m in metas] == [n for _, n in SCRIPT]
    # The repeat of A reuses all of A's prompt but its last token, whose logits it needs.
    cached = [m["cached_tokens"] for m in metas]
    assert cached == [0, len(PROMPT_A) - 1, 0]

    assert delta("prompt_tokens_total") == sum(len(p) for p, _ in SCRIPT)
    assert delta("generation_tokens_total") == sum(n for _, n in SCRIPT)
    assert delta("cached_tokens_total") == sum(cached)
    assert delta("num_requests_total") == len(SCRIPT)
    assert delta("num_aborted_requests_total") == 0
    # Each request: one first token, then one inter-token gap per further token.
    assert delta("time_to_first_token_seconds_count") == len(SCRIPT)
    assert delta("e2e_request_latency_seconds_count") == len(SCRIPT)
    assert delta("inter_token_latency_seconds_count") == sum(n - 1 for _, n in SCRIPT)
    assert delta("queue_time_seconds_count") == len(SCRIPT)
    assert delta("e2e_request_latency_seconds_sum") > 0
    # The largest bucket holds every observation.
    assert (metric(after, "e2e_request_latency_seconds_bucket[+Inf]")
            == metric(after, "e2e_request_latency_seconds_count"))

    # Idle: nothing runs or waits, and every KV slot is free or evictable.
    assert metric(after, "num_running_reqs") == 0
    assert metric(after, "num_queue_reqs") == 0
    assert metric(after, "num_used_tokens") == 0
    assert metric(after, "token_usage") == 0
    assert metric(after, "max_total_num_tokens") == live.server_info()["max_total_num_tokens"]

    # The prefill lines, one per request (the server ran them one at a time).
    prefill = read_log(log, r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), "
                            r"#cached-token: (\d+), token usage: ([\d.]+), "
                            r"#running-req: (\d+), #queue-req: (\d+)")
    mine = [tuple(int(m.group(i)) for i in (1, 2, 3, 5, 6)) for m in prefill[-len(SCRIPT):]]
    assert mine == [(1, len(p) - c, c, 0, 0) for (p, _), c in zip(SCRIPT, cached)]
    # A decode line every DECODE_LOG_INTERVAL decode steps: a request of n tokens takes
    # n - 1 decode steps (its first token comes from the prefill).
    decode = read_log(log, r"Decode batch, #running-req: (\d+), #token: (\d+), "
                           r"token usage: ([\d.]+), gen throughput \(token/s\): ([\d.]+), "
                           r"#queue-req: (\d+)")
    steps = sum(n - 1 for _, n in SCRIPT)
    assert len(decode) == steps // DECODE_LOG_INTERVAL
    assert all(m.group(1) == "1" and m.group(5) == "0" and float(m.group(4)) > 0
               for m in decode)
    # Each line's #token: the KV in use by the one running request at that step.
    assert all(0 < int(m.group(2)) <= max(len(p) + n for p, n in SCRIPT) for m in decode)

    # --log-requests-level 1: metadata and sampling parameters, no text.
    received = read_log(log, r"Receive: rid='([^']+)', prompt_tokens=(\d+), "
                             r"sampling_params=\{[^}]*'max_new_tokens': (\d+)")
    assert [(int(m.group(2)), int(m.group(3))) for m in received[-len(SCRIPT):]] == [
        (len(p), n) for p, n in SCRIPT]
    finished = read_log(log, r"Finish: rid='([^']+)', prompt_tokens=(\d+), "
                             r"completion_tokens=(\d+), cached_tokens=(\d+)")
    assert [(int(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in finished[-len(SCRIPT):]] == [
        (len(p), n, c) for (p, n), c in zip(SCRIPT, cached)]
    assert "text=" not in log.read_text()


def test_abort_counts_and_gauges_return_to_zero(
        metrics_server: tuple[LiveServer, Path]) -> None:
    live, _log = metrics_server
    before = scrape(live)

    async def run() -> dict[str, Any]:
        async with httpx2.AsyncClient(base_url=live.url, headers=live.headers,
                                      timeout=120) as c:
            task = asyncio.create_task(c.post("/generate", json={
                "input_ids": PROMPT_B, "rid": "metrics-abort",
                "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}))
            while True:  # until it is running
                await asyncio.sleep(0.05)
                info = (await c.get("/get_server_info")).json()
                if info["num_running_reqs"]:
                    break
            samples = scrape(live)
            await c.post("/abort_request", json={"rid": "metrics-abort"})
            return {"result": (await task).json(), "running": samples}

    got = asyncio.run(run())
    assert got["result"]["meta_info"]["finish_reason"]["type"] == "abort"
    after = wait_gauges_idle(live)
    assert metric(after, "num_aborted_requests_total") - metric(
        before, "num_aborted_requests_total") == 1
    assert metric(after, "num_requests_total") - metric(before, "num_requests_total") == 1
    generated = got["result"]["meta_info"]["completion_tokens"]
    assert metric(after, "generation_tokens_total") - metric(
        before, "generation_tokens_total") == generated
    assert metric(after, "num_running_reqs") == 0
    assert metric(after, "num_used_tokens") == 0


def test_metrics_off_is_404_and_imports_nothing(checkpoint: Path) -> None:
    """Without --enable-metrics: no /metrics route, and neither the server's modules nor
    an offline Engine run import prometheus_client (nor, without --enable-trace,
    opentelemetry's SDK)."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from radixserve.engine import Engine
from radixserve.entrypoints.http_server import create_app
from radixserve.server_args import ServerArgs

with Engine(model_path={str(checkpoint)!r}, max_total_tokens=1024) as eng:
    out = eng.generate(input_ids=[5, 6, 7], sampling_params={{"max_new_tokens": 3}})
    assert out["meta_info"]["completion_tokens"] == 3
    app = create_app(object(), eng.server_args)
    assert TestClient(app).get("/metrics").status_code == 404
assert "prometheus_client" not in sys.modules, "imported with metrics off"
# (fastapi imports opentelemetry's API itself; radixserve's tracing needs the SDK.)
assert not any(m.startswith("opentelemetry.sdk") for m in sys.modules), "tracing is off"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("flag, value", [("--metrics-prefix", "9bad"),
                                         ("--metrics-prefix", "a-b"),
                                         ("--log-requests-level", "4"),
                                         ("--decode-log-interval", "0")])
def test_bad_observability_flags_are_argparse_errors(flag: str, value: str) -> None:
    """One line naming the flag, exit status 2, before any model loads."""
    done = subprocess.run([sys.executable, "-m", "radixserve.launch_server", flag, value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"argument {flag}" in done.stderr.strip().splitlines()[-1]


def test_python_api_rejects_bad_values() -> None:
    from radixserve.server_args import ServerArgs

    for kwargs, field in [({"metrics_prefix": "x y"}, "metrics_prefix"),
                          ({"log_requests_level": 7}, "log_requests_level"),
                          ({"decode_log_interval": 0}, "decode_log_interval")]:
        with pytest.raises(ValueError, match=field):
            ServerArgs(model_path="unused", device="cpu", **kwargs)
