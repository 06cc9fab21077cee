"""The server against clients that leave, huge prompts, and garbage on its own sockets
(the hardening issue), on a server of its own: the default model, its IPC sockets in a
directory this test knows."""

from __future__ import annotations

import glob
import os
import pickle
import statistics
import threading
import time
from typing import Any, Iterator

import httpx2
import pytest
import zmq

from radixserve.core.sampling_params import SamplingParams
from radixserve.managers.io_struct import AbortReq, BatchTokenIDOut, TokenizedGenerateReqInput
from tests.conftest import API_KEY, LiveServer, child_pids, pid_alive, start_server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ipc_root = tmp_path_factory.mktemp("ipc")
    server = start_server("--api-key", API_KEY, log_name="hardening",
                          env={"TMPDIR": str(ipc_root)})
    server.ipc_dir = glob.glob(str(ipc_root / "radixserve-*"))[0]  # type: ignore[attr-defined]
    yield server
    server.proc.kill()
    server.proc.wait(timeout=30)


def _generate(live: LiveServer, text: str = "The capital of France is",
              max_new_tokens: int = 4, **kwargs: Any) -> httpx2.Response:
    with live.client() as c:
        return c.post("/generate", json={"text": text, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0}, **kwargs})


def _assert_serving(live: LiveServer) -> None:
    resp = _generate(live)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta_info"]["completion_tokens"] == 4
    assert all(pid_alive(p) for p in child_pids(live.proc.pid))


def _wait_idle_within(live: LiveServer, seconds: float) -> float:
    """Seconds until no request runs and the KV pool is back to idle (fails past
    `seconds`)."""
    t0 = time.monotonic()
    while True:
        info = live.server_info()
        idle = (info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
                and info["num_pending_requests"] == 0
                and info["available_tokens"] + info["evictable_tokens"]
                == info["max_total_num_tokens"])
        elapsed = time.monotonic() - t0
        if idle:
            return elapsed
        assert elapsed < seconds, f"not idle {elapsed:.1f}s after the clients left: {info}"
        time.sleep(0.05)


def test_dropped_non_streaming_requests_are_aborted(live: LiveServer,
                                                   capsys: pytest.CaptureFixture) -> None:
    """20 non-streaming requests of 2,000 tokens, their clients gone after 1 s: the
    server is idle, KV freed, within 2 s (it ran them to the end before)."""
    body = {"text": "Once upon a time", "sampling_params": {
        "max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}}
    errors: list[BaseException] = []

    def client() -> None:
        try:
            httpx2.post(f"{live.url}/generate", json=body, headers=live.headers, timeout=1.0)
            errors.append(AssertionError("a 2,000-token request finished within 1 s"))
        except httpx2.TimeoutException:
            pass  # the client hangs up
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert live.server_info()["num_running_reqs"] > 0  # they did reach the scheduler
    for t in threads:
        t.join()
    assert not errors, errors
    waited = _wait_idle_within(live, 2.0)
    with capsys.disabled():
        print(f"\nidle {waited:.2f}s after 20 dropped non-streaming requests")
    _assert_serving(live)


def test_health_answers_while_a_huge_prompt_is_tokenized(live: LiveServer,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Tokenizing a 4 MB prompt takes seconds; it runs off the event loop, so /health
    keeps answering throughout (it waited for the whole tokenization before)."""
    prompt = ("All work and no play makes Jack a dull boy. " * 100_000)[:4_000_000]
    done = threading.Event()
    result: dict[str, Any] = {}

    def big() -> None:
        t0 = time.monotonic()
        resp = _generate(live, prompt, max_new_tokens=1)
        result.update(status=resp.status_code, body=resp.json(), seconds=time.monotonic() - t0)
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    latencies: list[float] = []
    with httpx2.Client(base_url=live.url, timeout=30) as c:
        time.sleep(0.3)  # the body is sent and tokenizing
        while not done.is_set():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
    thread.join()
    # Longer than the context: refused, but only once it was tokenized.
    assert result["status"] == 400, result
    assert result["body"]["error"]["param"] == "prompt", result
    assert "tokens" in result["body"]["error"]["message"]
    with capsys.disabled():
        print(f"\n4 MB prompt: {result['seconds']:.2f}s; /health answered {len(latencies)} "
              f"times meanwhile, median {statistics.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")
    assert len(latencies) >= 5
    # A blocked event loop holds /health for the whole tokenization.
    assert max(latencies) < result["seconds"] / 2
    _assert_serving(live)


def _raw_socket(live: LiveServer, name: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{live.ipc_dir}/{name}")  # type: ignore[attr-defined]
    return ctx, sock


def _request(rid: str, **fields: Any) -> TokenizedGenerateReqInput:
    params = SamplingParams(max_new_tokens=2)
    params.normalize()
    req = TokenizedGenerateReqInput(rid=rid, input_text=None, input_ids=[1, 2, 3],
                                    sampling_params=params)
    for k, v in fields.items():
        setattr(req, k, v)
    return req


def _bad_params(**fields: Any) -> SamplingParams:
    params = SamplingParams()
    for k, v in fields.items():
        setattr(params, k, v)
    return params


MALFORMED_REQUESTS = [
    {"input_ids": ["a", None]},
    {"input_ids": "123"},
    {"input_ids": [10 ** 9]},
    {"sampling_params": {"max_new_tokens": 2}},
    {"sampling_params": _bad_params(skip_special_tokens="yes")},
    {"sampling_params": _bad_params(temperature=float("nan"))},
    {"sampling_params": _bad_params(stop_strs=[None], stop="x")},
    {"sampling_params": _bad_params(logit_bias={"x": 1.0})},
    {"sampling_params": _bad_params(regex=42)},
    {"return_logprob": "yes"},
    {"top_logprobs_num": 10 ** 6},
    {"stream": None},
]


def test_scheduler_survives_malformed_messages(live: LiveServer) -> None:
    """Garbage and malformed requests written straight to the scheduler's socket: each
    bad request is answered (its rid finishes with the error) or dropped, and the
    scheduler, detokenizer and every other request go on."""
    ctx, sock = _raw_socket(live, "scheduler")
    try:
        sock.send(b"not a pickle at all")
        sock.send(pickle.dumps(_request("ok"))[:20])  # truncated
        sock.send_pyobj({"rid": "a dict, not a request"})
        sock.send_pyobj(AbortReq(rid=["unhashable"]))  # type: ignore[arg-type]
        sock.send_pyobj(_request(rid=None))  # type: ignore[arg-type]
        for i, fields in enumerate(MALFORMED_REQUESTS):
            sock.send_pyobj(_request(f"bad-{i}", **fields))
        time.sleep(1.0)
        _assert_serving(live)
    finally:
        sock.close()
        ctx.term()
    _wait_idle_within(live, 10.0)


def _token_out(rids: Any, new_ids: Any, finished: Any, n: int = 1) -> BatchTokenIDOut:
    n = len(rids) if isinstance(rids, list) else n
    return BatchTokenIDOut(
        rids=rids, new_output_ids=new_ids, finished_reasons=finished, prompt_tokens=[1] * n,
        completion_tokens=[1] * n, cached_tokens=[0] * n, skip_special_tokens=[True] * n,
        spaces_between_special_tokens=[True] * n, no_stop_trim=[False] * n,
        output_token_logprobs=[None] * n, output_top_logprobs=[None] * n,
        input_token_logprobs=[None] * n, input_top_logprobs=[None] * n)


def test_detokenizer_survives_malformed_messages(live: LiveServer) -> None:
    """Garbage to the detokenizer is dropped; a row it cannot decode ends that request
    alone, with the error as its finish reason, and the scheduler frees it."""
    ctx, sock = _raw_socket(live, "detokenizer")
    try:
        sock.send(b"\x80\x05garbage")
        sock.send_pyobj(_token_out(["x"], None, [None]))
        sock.send_pyobj(_token_out(None, None, None))
        with live.client() as c, c.stream("POST", "/generate", json={
                "text": "Once upon a time", "rid": "victim", "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            # A row for the running request whose token ids are not integers.
            sock.send_pyobj(_token_out(["victim", "nobody"], [["t"], [5]], [None, 7]))
            chunks = [line for line in lines if line.startswith("data: {")]
        last = chunks[-1]
        assert '"type": "abort"' in last or '"type":"abort"' in last, last
        assert "detokenizer" in last
        _wait_idle_within(live, 5.0)
        _assert_serving(live)
    finally:
        sock.close()
        ctx.term()
