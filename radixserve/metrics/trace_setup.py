"""Which tracers a process gets: with --enable-trace off, null objects, and opentelemetry
is never imported (tracing.py imports it)."""

from __future__ import annotations

from typing import Any


class NullDetokenizerObserver:
    def on_handled(self, out: Any, start_ns: int, end_ns: int) -> None:
        pass


def make_detokenizer_observer(enable_trace: bool, endpoint: str) -> Any:
    """The detokenizer process's observer: `on_handled(out, start_ns, end_ns)` per
    message."""
    if not enable_trace:
        return NullDetokenizerObserver()
    from radixserve.metrics import tracing
    from radixserve.metrics.process_tracers import DetokenizerTracer

    tracing.setup_tracing(endpoint, "detokenizer")
    return DetokenizerTracer()


def make_scheduler_tracer(enable_trace: bool, endpoint: str) -> Any | None:
    """The scheduler's tracing output hook, or None."""
    if not enable_trace:
        return None
    from radixserve.metrics import tracing
    from radixserve.metrics.process_tracers import SchedulerTracer

    tracing.setup_tracing(endpoint, "scheduler")
    return SchedulerTracer()


def setup_api_tracing(enable_trace: bool, endpoint: str) -> None:
    if enable_trace:
        from radixserve.metrics import tracing

        tracing.setup_tracing(endpoint, "api")


def shutdown_tracing(enable_trace: bool) -> None:
    """Export the spans still queued in this process."""
    if enable_trace:
        from radixserve.metrics import tracing

        tracing.shutdown_tracing()
