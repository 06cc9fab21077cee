"""`data_parallel_rank` (SGLang's request field, which `sglang-router --dp-aware` adds to
every request) pins a request to one DP replica: on /generate, OpenAI chat and
completions and Engine.generate; out-of-range values are a 400 naming the field; and the
real router in --dp-aware mode spreads requests over the replicas of one worker with the
same greedy outputs as the worker gives directly. Each replica publishes its own metric
series (the `dp_rank` label)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from tests.conftest import API_KEY
from tests.router_harness import Worker, start_router, start_worker

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "Water boils at"]
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = start_worker("--api-key", API_KEY, "--dp-size", "2", "--enable-metrics",
                     log_name="dp-rank")
    yield w
    w.stop()


def _requests_per_replica(worker: Worker) -> list[int]:
    info = worker.live.server_info()
    return [r["num_requests_total"] for r in info["extra"]["dp_replicas"]]


def _generate(worker: Worker, **extra: Any) -> Any:
    with worker.live.client() as c:
        return c.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY,
                                         **extra})


def test_the_rank_pins_the_replica_and_changes_no_output(worker: Worker) -> None:
    free = _generate(worker).raise_for_status().json()
    for rank in (0, 1, 1, 0):
        before = _requests_per_replica(worker)
        got = _generate(worker, data_parallel_rank=rank).raise_for_status().json()
        assert got["output_ids"] == free["output_ids"]
        after = _requests_per_replica(worker)
        assert [a - b for a, b in zip(after, before)] == [int(rank == 0), int(rank == 1)]
    before = _requests_per_replica(worker)  # newer SGLang clients' name for it
    assert _generate(worker, routed_dp_rank=1).raise_for_status().json()["output_ids"] == \
        free["output_ids"]
    assert [a - b for a, b in zip(_requests_per_replica(worker), before)] == [0, 1]


def test_openai_endpoints_take_the_rank(worker: Worker) -> None:
    with worker.live.client() as c:
        for path, body in (("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/completions", {"prompt": PROMPTS[1]})):
            before = _requests_per_replica(worker)
            r = c.post(path, json={"model": "default", "max_tokens": 4, "temperature": 0,
                                   "data_parallel_rank": 1, **body})
            assert r.status_code == 200, r.text
            assert [a - b for a, b in zip(_requests_per_replica(worker), before)] == [0, 1]


def test_each_replica_has_its_own_metric_series(worker: Worker) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with worker.live.client() as c:
        text = c.get("/metrics").raise_for_status().text
    ranks = {s.labels.get("dp_rank"): s.value
             for family in text_string_to_metric_families(text)
             if family.name == "radixserve:max_total_num_tokens" for s in family.samples}
    assert set(ranks) == {"0", "1"}
    info = worker.live.server_info()["extra"]["dp_replicas"]
    assert [ranks["0"], ranks["1"]] == [r["max_total_num_tokens"] for r in info]


@pytest.mark.parametrize("bad", [2, -1, "1", True, 1.0, [0]])
def test_a_bad_rank_is_400_naming_the_field(worker: Worker, bad: Any) -> None:
    r = _generate(worker, data_parallel_rank=bad)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "data_parallel_rank"
    with worker.live.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "default", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "data_parallel_rank": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "data_parallel_rank"
    worker.live.wait_idle()


def test_router_dp_aware_spreads_over_the_replicas(worker: Worker) -> None:
    with worker.live.client() as c:
        want = [c.post("/generate", json={"text": p, "sampling_params": GREEDY})
                .raise_for_status().json()["output_ids"] for p in PROMPTS]
    before = _requests_per_replica(worker)
    router = start_router([worker.url], "round_robin", "--dp-aware", api_key=API_KEY,
                          expect_workers=2)
    try:
        with router.client() as c:
            got = [c.post("/generate", json={"text": p, "sampling_params": GREEDY})
                   .raise_for_status().json()["output_ids"] for p in PROMPTS]
    finally:
        router.stop()
    assert got == want
    served = [a - b for a, b in zip(_requests_per_replica(worker), before)]
    assert sum(served) == len(PROMPTS) and min(served) >= 1, served
    worker.live.wait_idle()


def test_engine_takes_the_rank() -> None:
    from radixserve.engine import Engine
    from radixserve.managers.request_validation import InvalidRequestError

    def per_replica(engine: Engine) -> list[int]:
        return [r["num_requests_total"] for r in engine.get_server_info().extra["dp_replicas"]]

    with Engine(dp_size=2, log_level="warning") as engine:
        free = engine.generate(PROMPTS[2], GREEDY)
        for rank in (1, 0):
            before = per_replica(engine)
            pinned = engine.generate(PROMPTS[2], GREEDY, data_parallel_rank=rank)
            assert pinned["output_ids"] == free["output_ids"]
            assert [a - b for a, b in zip(per_replica(engine), before)] == \
                [int(rank == 0), int(rank == 1)]
        with pytest.raises(InvalidRequestError, match="data_parallel_rank"):
            engine.generate(PROMPTS[2], GREEDY, data_parallel_rank=2)
