"""The scheduler's batch log lines (SGLang's format) carry the right numbers: chunked
prefill, prefix-cache hits, several requests in one batch, the decode interval. Run
through the offline Engine, which drives the same Scheduler and observers."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.model_factory import make_tiny_checkpoint

LOGGER = "radixserve.metrics.scheduler_observer"
PREFILL = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+), "
                     r"token usage: ([\d.]+), #running-req: (\d+), #queue-req: (\d+), ")
DECODE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+), token usage: ([\d.]+), "
                    r"gen throughput \(token/s\): ([\d.]+), #queue-req: (\d+), ")
CHUNK = 16
MAX_TOTAL_TOKENS = 2048
PROMPT = list(range(100, 140))  # 40 tokens: chunks of 16, 16 and 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("batch-log"))


# The plain loop, and the overlapped one (which launches a batch before processing the
# previous one): the lines are the same.
@pytest.fixture(scope="module", params=[False, True], ids=["plain", "overlap"])
def engine(checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    from radixserve.engine import Engine

    with Engine(model_path=str(checkpoint), max_total_tokens=MAX_TOTAL_TOKENS,
                chunked_prefill_size=CHUNK, decode_log_interval=3,
                enable_cpu_overlap=request.param) as eng:
        yield eng


def run(engine: object, caplog: pytest.LogCaptureFixture, prompts: list[list[int]],
        max_new_tokens: int) -> tuple[list[tuple[int, ...]], list[tuple[str, ...]], list]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = engine.generate(input_ids=prompts, sampling_params={
            "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0})
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    prefill = [tuple(int(g) if "." not in g else -1 for g in m.groups())
               for m in map(PREFILL.fullmatch, lines) if m]
    decode = [m.groups() for m in map(DECODE.fullmatch, lines) if m]
    assert len(prefill) + len(decode) == len(lines), lines
    return prefill, decode, out


def test_chunked_prefill_then_cache_hit(engine: object, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    engine.flush_cache()
    prefill, decode, _ = run(engine, caplog, [PROMPT], 7)
    # (#new-seq, #new-token, #cached-token, -, #running-req, #queue-req), one per chunk.
    assert [p[:3] + p[4:] for p in prefill] == [(1, 16, 0, 0, 0), (1, 16, 0, 0, 0),
                                                (1, 8, 0, 0, 0)]
    # 7 tokens: the first from the prefill, then 6 decode steps: lines at steps 3 and 6,
    # with the KV of the prompt and of the tokens decoded so far.
    assert [(int(d[0]), int(d[1]), int(d[4])) for d in decode] == [
        (1, len(PROMPT) + 3, 0), (1, len(PROMPT) + 6, 0)]
    assert all(float(d[2]) == pytest.approx(int(d[1]) / MAX_TOTAL_TOKENS, abs=0.005)
               for d in decode)

    # The same prompt again: all of it but the last token comes from the cache.
    prefill, _, out = run(engine, caplog, [PROMPT], 1)
    assert [p[:3] for p in prefill] == [(1, 1, len(PROMPT) - 1)]
    assert out[0]["meta_info"]["cached_tokens"] == len(PROMPT) - 1

    # A prompt sharing A's first 20 tokens: those are cached, the rest chunked anew.
    shared = PROMPT[:20] + list(range(500, 520))
    prefill, _, _ = run(engine, caplog, [shared], 1)
    assert [p[:3] for p in prefill] == [(1, 16, 20), (1, 4, 0)]


def test_two_requests_in_one_batch(engine: object, caplog: pytest.LogCaptureFixture) -> None:
    engine.flush_cache()
    a, b = list(range(600, 606)), list(range(700, 708))  # 6 + 8 tokens fit one chunk
    prefill, decode, _ = run(engine, caplog, [a, b], 4)
    assert [p[:3] + p[4:] for p in prefill] == [(2, len(a) + len(b), 0, 0, 0)]
    # 3 decode steps, both requests in each: one line, at step 3.
    assert [(int(d[0]), int(d[1])) for d in decode] == [(2, len(a) + len(b) + 2 * 3)]
