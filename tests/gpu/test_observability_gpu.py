"""Batch log lines and scheduler metrics on CUDA, where the overlapped loop and CUDA
graphs are on: the same numbers as the CPU tests (tests/test_batch_log.py)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
prometheus_client = pytest.importorskip("prometheus_client")

PREFILL = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+),")
DECODE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+),")
PROMPT = list(range(100, 140))
INTERVAL = 4


def test_lines_and_metrics_under_overlap_and_cuda_graphs(tmp_path, caplog) -> None:
    from radixserve.engine import Engine
    from tests.model_factory import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "ckpt", with_tokenizer=False)
    with Engine(model_path=str(path), skip_tokenizer_init=True, max_total_tokens=4096,
                mem_fraction_static=0.5, enable_metrics=True, metrics_prefix="gputest",
                decode_log_interval=INTERVAL) as eng:
        assert eng.scheduler.overlap
        with caplog.at_level(logging.INFO, logger="radixserve.metrics.scheduler_observer"):
            for n in (9, 9):
                eng.generate(input_ids=PROMPT, sampling_params={
                    "max_new_tokens": n, "ignore_eos": True, "temperature": 0})
        text = caplog.text
        labels = {"model_name": str(path), "engine_type": "unified", "tp_rank": "0",
                  "pp_rank": "0"}

        def value(name: str) -> float | None:
            return prometheus_client.REGISTRY.get_sample_value(f"gputest:{name}", labels)

        assert [tuple(map(int, m.groups())) for m in PREFILL.finditer(text)] == [
            (1, len(PROMPT), 0), (1, 1, len(PROMPT) - 1)]
        decode = [tuple(map(int, m.groups())) for m in DECODE.finditer(text)]
        assert len(decode) == 2 * 8 // INTERVAL and all(d[0] == 1 for d in decode)
        assert value("queue_time_seconds_count") == 2
        assert value("num_running_reqs") == 0 and value("num_queue_reqs") == 0
        assert value("num_used_tokens") == 0
        assert value("max_total_num_tokens") == eng.scheduler.max_total_num_tokens
