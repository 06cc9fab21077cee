"""The scheduler's observers: the batch log lines and, with --enable-metrics, its
Prometheus metrics, with --enable-trace its spans, registered as output hooks
(radixserve/metrics/)."""

from __future__ import annotations

from typing import Any

from radixserve.core.req import Req
from radixserve.distributed.parallel_state import get_tp_group
from radixserve.metrics.scheduler_collector import SchedulerMetricsCollector
from radixserve.metrics.scheduler_observer import SchedulerObserver
from radixserve.metrics.trace_setup import make_scheduler_tracer
from radixserve.server_args import ServerArgs


class SchedulerStateView:
    """`metrics.scheduler_observer.SchedulerState` over a Scheduler."""

    def __init__(self, scheduler: Any) -> None:
        self._s = scheduler
        self.max_total_num_tokens: int = scheduler.max_total_num_tokens

    def num_queue_reqs(self) -> int:
        return len(self._s.waiting_queue)

    def running_reqs(self) -> list[Req]:
        return self._s.running

    def chunked_req(self) -> Req | None:
        return self._s.chunked_req

    def num_used_tokens(self) -> int:
        kv = self._s.kv
        return (self.max_total_num_tokens - kv.allocator.available_size()
                - kv.tree_cache.evictable_size())

    def num_retractions(self) -> int:
        return self._s.stats.num_retractions

    def new_token_ratio(self) -> float:
        return self._s.prefill.ratio.value


def attach_observers(scheduler: Any, server_args: ServerArgs, dp_rank: int = 0) -> None:
    """Register the observers on TP rank 0 (the other ranks run the same batches). Under
    DP each replica's series carry its `dp_rank` label, as SGLang's do (without it the
    replicas' gauges would overwrite one another)."""
    if get_tp_group().rank != 0:
        return
    collector = None
    if server_args.enable_metrics:
        labels = {"model_name": str(server_args.served_model_name or server_args.model_path),
                  "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
        if server_args.dp_size > 1:
            labels["dp_rank"] = str(dp_rank)
        collector = SchedulerMetricsCollector(server_args.metrics_prefix, labels)
    scheduler.output.hooks.append(SchedulerObserver(
        SchedulerStateView(scheduler), server_args.decode_log_interval, collector))
    tracer = make_scheduler_tracer(server_args.enable_trace, server_args.otlp_traces_endpoint)
    if tracer is not None:
        scheduler.output.hooks.append(tracer)
