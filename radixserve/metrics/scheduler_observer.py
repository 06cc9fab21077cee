"""The scheduler's observer: an output hook (managers/output_processor.py) that writes
the batch log lines and, with --enable-metrics, the scheduler's Prometheus metrics.

It reads the scheduler through `SchedulerState` and the batches it is shown; it keeps
its own counts (decode steps, tokens decoded, requests mid-chunk) instead of asking the
scheduler's step for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from radixserve.core.batch_result import BatchResult
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.metrics.batch_log import (DecodeBatchStats, PrefillBatchStats, decode_line,
                                          prefill_line)
from radixserve.metrics.scheduler_collector import SchedulerGauges, SchedulerMetricsCollector

logger = logging.getLogger(__name__)


class SchedulerState(Protocol):
    """What the observer reads of the scheduler."""

    max_total_num_tokens: int

    def num_queue_reqs(self) -> int: ...
    def running_reqs(self) -> list[Req]: ...  # may still hold finished ones mid-step
    def chunked_req(self) -> Req | None: ...
    def num_used_tokens(self) -> int: ...  # KV slots neither free nor evictable
    def num_retractions(self) -> int: ...  # since start
    def new_token_ratio(self) -> float: ...


class SchedulerObserver:
    def __init__(self, state: SchedulerState, decode_log_interval: int,
                 collector: SchedulerMetricsCollector | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.state = state
        self.decode_log_interval = decode_log_interval
        self.collector = collector
        self.clock = clock
        self._chunking: set[int] = set()  # id() of requests between prompt chunks
        self._decode_steps = 0
        self._decoded = 0  # tokens decoded since the last decode line
        self._last_decode_line = clock()
        self._retractions_reported = 0
        self._gen_throughput = 0.0
        self._cache_hit_rate = 0.0
        # A gauge never set exports its family without samples, which breaks tools that
        # merge workers' /metrics by label names (sglang-router's /engine_metrics).
        self._publish(0)

    # --- hook ------------------------------------------------------------------------

    def on_batch_launched(self, batch: ScheduleBatch) -> None:
        if batch.forward_mode.is_decode():
            self._on_decode(batch)
        else:
            self._on_prefill(batch)

    def on_batch_processed(self, batch: ScheduleBatch, result: BatchResult) -> None:
        # Idle after this batch: report the zeros (a gauge keeps its last value).
        if (self.state.num_queue_reqs() == 0 and self.state.chunked_req() is None
                and all(r.finished() for r in batch.reqs)
                and all(r.finished() for r in self.state.running_reqs())):
            self._gen_throughput = 0.0
            self._decoded = 0
            self._last_decode_line = self.clock()
            self._publish(0)

    def on_request_finished(self, req: Req) -> None:
        self._chunking.discard(id(req))
        # Aborted from the queue with nothing running: no batch follows to report it.
        if not self.state.running_reqs() and self.state.chunked_req() is None:
            self._publish(0)

    # --- prefill and decode ----------------------------------------------------------

    def _on_prefill(self, batch: ScheduleBatch) -> None:
        now = self.clock()
        new_seq = new_token = cached = 0
        prefill_ids: set[int] = set()
        for i, req in enumerate(batch.reqs):
            if not batch.is_prefill_row(i):
                self._decoded += 1  # a decode row of a mixed batch
                continue
            prefill_ids.add(id(req))
            new_seq += 1
            new_token += req.extend_input_len
            if id(req) not in self._chunking:
                # A first chunk starts where the cached prefix ends; later ones reuse
                # nothing from the cache.
                cached += len(req.fill_ids) - req.extend_input_len
                if self.collector is not None and req.num_retractions == 0:
                    self.collector.observe_queue_time(now - req.time_received)
            if batch.chunked[i]:
                self._chunking.add(id(req))
            else:
                self._chunking.discard(id(req))
        self._cache_hit_rate = cached / (cached + new_token) if cached + new_token else 0.0
        running = sum(1 for r in self.state.running_reqs()
                      if id(r) not in prefill_ids and not r.finished())
        stats = PrefillBatchStats(new_seq, new_token, cached, self._token_usage(), running,
                                  self.state.num_queue_reqs())
        logger.info(prefill_line(stats))
        self._publish(running)

    def _on_decode(self, batch: ScheduleBatch) -> None:
        self._decode_steps += 1
        self._decoded += batch.batch_size
        if self._decode_steps % self.decode_log_interval:
            return
        now = self.clock()
        elapsed = now - self._last_decode_line
        self._gen_throughput = self._decoded / elapsed if elapsed > 0 else 0.0
        self._decoded = 0
        self._last_decode_line = now
        stats = DecodeBatchStats(batch.batch_size, self.state.num_used_tokens(),
                                 self._token_usage(), self._gen_throughput,
                                 self.state.num_queue_reqs())
        logger.info(decode_line(stats))
        self._publish(batch.batch_size)

    # --- metrics ---------------------------------------------------------------------

    def _token_usage(self) -> float:
        return self.state.num_used_tokens() / max(self.state.max_total_num_tokens, 1)

    def _publish(self, num_running: int) -> None:
        if self.collector is None:
            return
        total = self.state.num_retractions()
        self.collector.observe_retractions(total - self._retractions_reported)
        self._retractions_reported = total
        self.collector.log_stats(SchedulerGauges(
            num_running_reqs=num_running, num_queue_reqs=self.state.num_queue_reqs(),
            num_used_tokens=self.state.num_used_tokens(), token_usage=self._token_usage(),
            cache_hit_rate=self._cache_hit_rate, gen_throughput=self._gen_throughput,
            max_total_num_tokens=self.state.max_total_num_tokens,
            new_token_ratio=self.state.new_token_ratio()))
