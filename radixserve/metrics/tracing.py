"""--enable-trace: OpenTelemetry spans per request, across the three processes.

A request's trace is named by its rid: its trace id and the id of its root span are
hashes of the rid, so the scheduler and the detokenizer attach their spans to the root
that the API server records without any id crossing the process boundary. The API
server records `request` (the root) and `tokenize`; the scheduler `queue`, `prefill` and
`decode`; the detokenizer `detokenize`. Spans are built from timestamps once a request
finishes, so nothing is held open across steps.

opentelemetry is imported only here, and this module only with --enable-trace.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

logger = logging.getLogger(__name__)

SERVICE_NAME = "radixserve"
TRACER_NAME = "radixserve"

# The ids the next root span takes, set while the API server starts a request's root.
_forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "radixserve_forced_ids", default=None)


def rid_ids(rid: str) -> tuple[int, int]:
    """(trace id, root span id) of the request `rid`: never 0, which OTel reserves."""
    digest = hashlib.sha256(rid.encode()).digest()
    return (int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1)


class RidIdGenerator(RandomIdGenerator):
    """Random ids, except for a request's root span, whose ids come from its rid."""

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        return forced[0] if forced else super().generate_trace_id()

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        if forced:
            _forced_ids.set(None)  # the root's id only; its children get random ones
            return forced[1]
        return super().generate_span_id()


_provider: TracerProvider | None = None


def make_provider(processor: SpanProcessor, role: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME,
                                                        "radixserve.process": role}),
                              id_generator=RidIdGenerator())
    provider.add_span_processor(processor)
    return provider


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over HTTP for an http(s):// endpoint, else over gRPC (HOST:PORT, SGLang's
    form); each needs its exporter package."""
    if endpoint.startswith(("http://", "https://")):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else \
            endpoint.rstrip("/") + "/v1/traces"
        return OTLPSpanExporter(endpoint=url)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter)

    return GrpcExporter(endpoint=endpoint, insecure=True)


def setup_tracing(endpoint: str, role: str) -> None:
    """This process's tracer, exporting to `endpoint` in batches (off the hot path)."""
    use_provider(make_provider(BatchSpanProcessor(otlp_exporter(endpoint)), role))


def use_provider(provider: TracerProvider | None) -> None:
    """Set (or, with None, drop) this process's provider; tests pass an in-memory one."""
    global _provider
    _provider = provider


def shutdown_tracing() -> None:
    """Export what is still queued (at process exit)."""
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    if _provider is None:
        raise RuntimeError("tracing is not set up in this process")
    return _provider.get_tracer(TRACER_NAME)


def perf_to_ns(perf: float) -> int:
    """A time.perf_counter() reading as wall-clock nanoseconds (spans from several
    processes share the wall clock)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def root_context(rid: str) -> Any:
    """The context under which another process's spans of request `rid` are made."""
    trace_id, span_id = rid_ids(rid)
    parent = SpanContext(trace_id, span_id, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


@contextmanager
def _forcing(rid: str) -> Iterator[None]:
    token = _forced_ids.set(rid_ids(rid))
    try:
        yield
    finally:
        _forced_ids.reset(token)


def record_root(rid: str, start_ns: int, end_ns: int, attributes: dict[str, Any],
                children: list[tuple[str, int, int]]) -> None:
    """The API server's part of a finished request: the root span `request` and its
    `children` (name, start, end), made after the fact."""
    t = tracer()
    with _forcing(rid):
        root = t.start_span("request", start_time=start_ns, attributes=attributes)
    context = trace.set_span_in_context(root)
    for name, start, end in children:
        t.start_span(name, context=context, start_time=start).end(end_time=end)
    root.end(end_time=end_ns)


def record_child(rid: str, name: str, start_ns: int, end_ns: int,
                 attributes: dict[str, Any] | None = None) -> None:
    """A span of request `rid` made in another process than the API server's."""
    span = tracer().start_span(name, context=root_context(rid), start_time=start_ns,
                               attributes=attributes or {})
    span.end(end_time=end_ns)
