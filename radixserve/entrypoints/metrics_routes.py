"""GET /metrics: the Prometheus exposition of every process's metrics (--enable-metrics).

Without --enable-metrics the route does not exist (404) and prometheus_client is never
imported."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from radixserve.metrics.prometheus_setup import render_metrics
from radixserve.server_args import ServerArgs


def add_metrics_routes(app: FastAPI, server_args: ServerArgs) -> None:
    if not server_args.enable_metrics:
        return

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)
