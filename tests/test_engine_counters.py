"""Engine.get_server_info() carries /metrics' request counters (num_requests_total,
num_aborted_requests_total, prompt_tokens_total, generation_tokens_total,
cached_tokens_total): after a scripted workload they move by exactly what it implies,
an aborted stream counts as a request and an abort, and a refused request counts as
nothing. (tests/test_dashboard.py checks they equal /metrics' on a live server.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from radixserve.engine import Engine
from tests.model_factory import make_tiny_checkpoint

COUNTERS = ("num_requests_total", "num_aborted_requests_total", "prompt_tokens_total",
            "generation_tokens_total", "cached_tokens_total")
PROMPT_A = list(range(100, 140))  # 40 tokens, below the tiny vocabulary, no EOS (2)
PROMPT_B = list(range(300, 320))  # 20 tokens
# Run one after the other: the second A finds the first A's prompt in the radix cache.
SCRIPT = [(PROMPT_A, 5), (PROMPT_A, 5), (PROMPT_B, 7)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("counters-llama"))
    with Engine(model_path=str(path), max_total_tokens=4096,
                disable_progress_bar=True) as eng:
        yield eng


def counters(engine: Engine) -> dict[str, int]:
    info = engine.get_server_info()
    return {k: getattr(info, k) for k in COUNTERS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in COUNTERS}


def run(engine: Engine, prompt: list[int], n: int) -> dict[str, Any]:
    return engine.generate(input_ids=prompt, sampling_params={
        "max_new_tokens": n, "ignore_eos": True, "temperature": 0})


def test_scripted_workload_moves_counters_exactly(engine: Engine) -> None:
    engine.flush_cache()
    before = counters(engine)
    metas = [run(engine, p, n)["meta_info"] for p, n in SCRIPT]
    # The repeat of A reuses all of A's prompt but its last token, whose logits it needs.
    assert [m["cached_tokens"] for m in metas] == [0, len(PROMPT_A) - 1, 0]
    assert delta(before, counters(engine)) == {
        "num_requests_total": len(SCRIPT), "num_aborted_requests_total": 0,
        "prompt_tokens_total": sum(len(p) for p, _ in SCRIPT),
        "generation_tokens_total": sum(n for _, n in SCRIPT),
        "cached_tokens_total": len(PROMPT_A) - 1}


def test_aborted_counts_refused_does_not(engine: Engine) -> None:
    before = counters(engine)
    with pytest.raises(ValueError):
        run(engine, PROMPT_B, -1)  # refused before it reaches the scheduler
    assert delta(before, counters(engine)) == dict.fromkeys(COUNTERS, 0)

    max_new = 50
    stream = engine.generate(input_ids=PROMPT_B, stream=True, sampling_params={
        "max_new_tokens": max_new, "ignore_eos": True, "temperature": 0})
    seen = next(stream)["meta_info"]["completion_tokens"]
    stream.close()  # abandons the request: the Engine aborts it
    # Another request steps the scheduler past the abort.
    run(engine, PROMPT_A, 1)
    d = delta(before, counters(engine))
    assert d["num_requests_total"] == 2 and d["num_aborted_requests_total"] == 1
    assert d["prompt_tokens_total"] == len(PROMPT_B) + len(PROMPT_A)
    # The aborted one made at least the tokens streamed, and fewer than it asked for.
    assert 1 + seen <= d["generation_tokens_total"] < 1 + max_new
