"""The scheduler's and the detokenizer's spans of each request (--enable-trace), children
of the root the API server records (tracing.py)."""

from __future__ import annotations

import time
from typing import Any

from radixserve.core.batch_result import BatchResult
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.metrics import tracing


class SchedulerTracer:
    """An output hook: `queue` (received to first prefill), `prefill` (first prefill
    launched to its token processed) and `decode` (from there to the finish)."""

    def __init__(self) -> None:
        # id(req) -> [first prefill launched, first token processed] (wall ns; 0: not yet)
        self._times: dict[int, list[int]] = {}

    def on_batch_launched(self, batch: ScheduleBatch) -> None:
        if batch.forward_mode.is_decode():
            return
        now = time.time_ns()
        for i, req in enumerate(batch.reqs):
            if batch.is_prefill_row(i):
                self._times.setdefault(id(req), [now, 0])

    def on_batch_processed(self, batch: ScheduleBatch, result: BatchResult) -> None:
        if batch.forward_mode.is_decode():
            return
        now = time.time_ns()
        for i, req in enumerate(batch.reqs):
            t = self._times.get(id(req))
            if t is not None and not t[1] and batch.is_prefill_row(i) and not batch.chunked[i]:
                t[1] = now

    def on_request_finished(self, req: Req) -> None:
        now = time.time_ns()
        received = tracing.perf_to_ns(req.time_received)
        t = self._times.pop(id(req), None)
        if t is None:  # finished while waiting (aborted)
            tracing.record_child(req.rid, "queue", received, now)
            return
        prefill_start, first_token = t
        tracing.record_child(req.rid, "queue", received, prefill_start)
        tracing.record_child(req.rid, "prefill", prefill_start, first_token or now, {
            "radixserve.prompt_tokens": len(req.origin_input_ids),
            "radixserve.cached_tokens": req.cached_tokens})
        if first_token:
            tracing.record_child(req.rid, "decode", first_token, now, {
                "radixserve.completion_tokens": len(req.output_ids),
                "radixserve.finish_reason": str((req.finished_reason or {}).get("type"))})


class DetokenizerTracer:
    """`detokenize`: from a request's first message handled to its last; the attribute
    says how long handling its messages took in all."""

    def __init__(self) -> None:
        self._open: dict[str, list[int]] = {}  # rid -> [first start, busy ns]

    def on_handled(self, out: Any, start_ns: int, end_ns: int) -> None:
        """`out`: a BatchStrOut, handled from `start_ns` to `end_ns`."""
        busy = end_ns - start_ns
        for i, rid in enumerate(out.rids):
            t = self._open.setdefault(rid, [start_ns, 0])
            t[1] += busy
            if out.finished_reasons[i] is not None:
                del self._open[rid]
                tracing.record_child(rid, "detokenize", t[0], end_ns,
                                     {"radixserve.busy_ms": t[1] / 1e6})
