"""The scheduler's counters, read by /get_server_info, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.core.req import Req


@dataclass
class SchedulerStats:
    num_retractions: int = 0
    total_prefill_tokens: int = 0  # tokens actually run through prefill (not cached)
    total_cached_tokens: int = 0
    # Host time of the last step, without the time spent waiting for the device.
    last_step_host_s: float = 0.0
    # Finished requests (aborted ones included, refused ones not), counted as /metrics'
    # counters of the same names count them, for Engine.get_server_info().
    num_requests_total: int = 0
    num_aborted_requests_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0


class FinishedRequestCounter:
    """An output hook adding each finished request to the stats. A request the
    scheduler refuses (a 400) never reaches OutputProcessor.finish, so it is not counted,
    as the API server's counters do not count it."""

    def __init__(self, stats: SchedulerStats) -> None:
        self.stats = stats

    def on_batch_launched(self, batch: Any) -> None:
        pass

    def on_batch_processed(self, batch: Any, result: Any) -> None:
        pass

    def on_request_finished(self, req: Req) -> None:
        s = self.stats
        s.num_requests_total += 1
        if req.finished_reason is not None and req.finished_reason.get("type") == "abort":
            s.num_aborted_requests_total += 1
        s.prompt_tokens_total += len(req.origin_input_ids)
        s.generation_tokens_total += req.num_resolved
        s.cached_tokens_total += req.cached_tokens
