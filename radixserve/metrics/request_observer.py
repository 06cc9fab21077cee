"""The TokenizerManager's observer: per-request timings (time to first token,
inter-token latency, end-to-end latency), token counters, --log-requests lines and, with
--enable-trace, each request's root span (tracing.py).

The TokenizerManager tells it when requests are sent to the scheduler (`on_sent`) and
hands it every detokenizer message (`on_output`); it keeps its own per-rid state, so
it also sees the final message of a request whose client already left. With metrics,
request logs and tracing off the TokenizerManager holds a `NullRequestObserver`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from radixserve.metrics.request_log import finish_line, receive_line
from radixserve.metrics.tokenizer_collector import TokenizerMetricsCollector
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class SentRequest(Protocol):
    rid: str
    input_text: str | None
    input_ids: list[int]
    sampling_params: Any


class StrOutput(Protocol):
    """The fields of a BatchStrOut the observer reads."""

    rids: list[str]
    text_deltas: list[str]
    output_ids: list[list[int]]
    finished_reasons: list[dict[str, Any] | None]
    completion_tokens: list[int]
    cached_tokens: list[int]


class NullRequestObserver:
    def on_sent(self, reqs: list[Any], received: float) -> None:
        pass

    def on_output(self, out: Any) -> None:
        pass


@dataclass
class _Timing:
    received: float
    sent: float
    prompt_tokens: int
    first_token: float = 0.0
    last_token: float = 0.0
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)  # kept for --log-requests-level >= 2
    output_ids: list[int] = field(default_factory=list)  # kept for level 3


class RequestObserver:
    def __init__(self, collector: TokenizerMetricsCollector | None, log_requests: bool,
                 log_level: int, trace: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.collector = collector
        self.log_requests = log_requests
        self.log_level = log_level
        self.trace = trace
        self.clock = clock
        self._timings: dict[str, _Timing] = {}

    def on_sent(self, reqs: list[SentRequest], received: float) -> None:
        """`received`: when the call arrived (clock), before tokenization."""
        sent = self.clock()
        for req in reqs:
            self._timings[req.rid] = _Timing(received, sent, len(req.input_ids))
            if self.log_requests:
                logger.info(receive_line(req.rid, req.input_text, req.input_ids,
                                         req.sampling_params, self.log_level))

    def on_output(self, out: StrOutput) -> None:
        now = self.clock()
        for i, rid in enumerate(out.rids):
            t = self._timings.get(rid)
            if t is None:
                continue
            new = out.completion_tokens[i] - t.completion_tokens
            if new > 0:
                self._on_tokens(t, new, now)
            if self.log_requests and self.log_level >= 2:
                t.text.append(out.text_deltas[i])
                if self.log_level >= 3:
                    t.output_ids.extend(out.output_ids[i])
            reason = out.finished_reasons[i]
            if reason is not None:
                del self._timings[rid]
                self._on_finished(rid, t, reason, out.cached_tokens[i], now)

    def _on_tokens(self, t: _Timing, new: int, now: float) -> None:
        if self.collector is not None:
            if t.completion_tokens == 0:
                self.collector.observe_first_token(now - t.received)
            else:
                self.collector.observe_inter_token(now - t.last_token, new)
        if t.completion_tokens == 0:
            t.first_token = now
        t.last_token = now
        t.completion_tokens += new

    def _on_finished(self, rid: str, t: _Timing, reason: dict[str, Any], cached: int,
                     now: float) -> None:
        if reason.get("status_code") == 400:
            return  # refused by the scheduler's checks: not a served request
        aborted = reason.get("type") == "abort"
        if self.collector is not None:
            self.collector.observe_finished(t.prompt_tokens, t.completion_tokens, cached,
                                            now - t.received, aborted)
        if self.trace:
            self._record_trace(rid, t, reason, cached, now)
        if self.log_requests:
            meta = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                    "cached_tokens": cached, "finish_reason": reason,
                    "e2e_latency": round(now - t.received, 6)}
            logger.info(finish_line(rid, meta, "".join(t.text), t.output_ids, self.log_level))


    def _record_trace(self, rid: str, t: _Timing, reason: dict[str, Any], cached: int,
                      now: float) -> None:
        from radixserve.metrics import tracing

        ns = tracing.perf_to_ns
        attributes = {"radixserve.rid": rid, "radixserve.prompt_tokens": t.prompt_tokens,
                      "radixserve.completion_tokens": t.completion_tokens,
                      "radixserve.cached_tokens": cached,
                      "radixserve.finish_reason": str(reason.get("type"))}
        tracing.record_root(rid, ns(t.received), ns(now), attributes,
                            [("tokenize", ns(t.received), ns(t.sent))])


def make_request_observer(server_args: ServerArgs, model_name: str
                          ) -> RequestObserver | NullRequestObserver:
    a = server_args
    if not (a.enable_metrics or a.log_requests or a.enable_trace):
        return NullRequestObserver()
    collector = (TokenizerMetricsCollector(a.metrics_prefix, {"model_name": model_name})
                 if a.enable_metrics else None)
    return RequestObserver(collector, a.log_requests, a.log_requests_level, a.enable_trace)
