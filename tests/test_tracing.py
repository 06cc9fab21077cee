"""--enable-trace: a live server's three processes send their spans over OTLP/HTTP to a
collector in this test process; each request's trace has the root `request` and its
children tokenize, queue, prefill, decode and detokenize, in time order."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest)

from radixserve.metrics.tracing import rid_ids  # noqa: E402
from tests.conftest import LiveServer, start_server  # noqa: E402
from tests.model_factory import make_tiny_checkpoint  # noqa: E402

CHILDREN = {"tokenize", "queue", "prefill", "decode", "detokenize"}
# Spans from several processes meet on the wall clock; perf_counter readings are turned
# into it with this much jitter at most.
SLACK_NS = 5_000_000


class Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with collector.lock:
                    for rs in req.resource_spans:
                        role = next(a.value.string_value for a in rs.resource.attributes
                                    if a.key == "radixserve.process")
                        for ss in rs.scope_spans:
                            collector.spans += [_span(s, role) for s in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def by_trace(self) -> dict[int, list[dict[str, Any]]]:
        with self.lock:
            out: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for s in self.spans:
                out[s["trace_id"]].append(s)
            return out


def _span(s: Any, role: str) -> dict[str, Any]:
    return {"name": s.name, "trace_id": int.from_bytes(s.trace_id, "big"),
            "span_id": int.from_bytes(s.span_id, "big"),
            "parent": int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else None,
            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano, "role": role,
            "attributes": {a.key: a.value for a in s.attributes}}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Collector]]:
    collector = Collector()
    path: Path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("trace-llama"))
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 0.2 s, not every 5 s
    try:
        live = start_server("--model-path", str(path), "--max-total-tokens", "2048",
                            "--enable-trace", "--otlp-traces-endpoint", collector.url,
                            "--api-key", "k", log_name="trace")
    finally:
        mp.undo()
    live.api_key = "k"
    yield live, collector
    live.proc.terminate()
    live.proc.wait(timeout=30)
    collector.server.shutdown()


def test_each_request_has_one_trace_with_all_stages(traced: tuple[LiveServer, Collector]
                                                    ) -> None:
    live, collector = traced
    rids = ["trace-a", "trace-b"]
    with live.client() as c:
        for rid, n in zip(rids, (3, 6)):
            r = c.post("/generate", json={"input_ids": list(range(100, 130)), "rid": rid,
                                          "sampling_params": {"max_new_tokens": n,
                                                              "ignore_eos": True}})
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        traces = collector.by_trace()
        if all(len(traces.get(rid_ids(rid)[0], [])) >= 1 + len(CHILDREN) for rid in rids):
            break
        assert time.monotonic() < deadline, f"spans missing: {collector.spans}"
        time.sleep(0.2)

    for rid, n in zip(rids, (3, 6)):
        spans = {s["name"]: s for s in traces[rid_ids(rid)[0]]}
        assert set(spans) == {"request"} | CHILDREN
        root = spans["request"]
        assert root["parent"] is None and root["span_id"] == rid_ids(rid)[1]
        assert root["attributes"]["radixserve.completion_tokens"].int_value == n
        assert {spans[c]["parent"] for c in CHILDREN} == {root["span_id"]}
        assert {spans[c]["role"] for c in CHILDREN} == {"api", "scheduler", "detokenizer"}
        assert spans["tokenize"]["role"] == "api" and spans["detokenize"]["role"] == "detokenizer"
        for name in CHILDREN:
            assert root["start"] - SLACK_NS <= spans[name]["start"] <= spans[name]["end"] \
                <= root["end"] + SLACK_NS, name
        # The stages follow each other.
        order = ["tokenize", "queue", "prefill", "decode"]
        for a, b in zip(order, order[1:]):
            assert spans[a]["end"] <= spans[b]["start"] + SLACK_NS, (a, b)
        assert spans["decode"]["attributes"]["radixserve.completion_tokens"].int_value == n


def test_missing_exporter_is_an_argparse_error() -> None:
    """--enable-trace with the default HOST:PORT endpoint needs the gRPC exporter: when it
    is not installed, one argparse line names the package, before any model loads."""
    import importlib.util
    import subprocess
    import sys

    try:
        grpc = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    except ModuleNotFoundError:
        grpc = False
    if grpc:
        pytest.skip("the gRPC exporter is installed")
    done = subprocess.run([sys.executable, "-m", "radixserve.launch_server", "--enable-trace"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "opentelemetry-exporter-otlp-proto-grpc" in done.stderr.strip().splitlines()[-1]
