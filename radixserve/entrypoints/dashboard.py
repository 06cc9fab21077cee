"""GET /dashboard (a live page of the server's load), the JSON it polls
(GET /dashboard/data) and SGLang's GET /get_load, which sglang-router also reads.

Both JSON routes ask the scheduler for its ServerInfo; /dashboard/data adds, with
--enable-metrics, the generation throughput gauge and the time-to-first-token histogram's
sum and count from the Prometheus files (the page plots the mean TTFT of each poll
interval from their differences). Without --enable-metrics those two are null and the
page says so; it still plots requests, KV usage, the radix tree and the cache hit rate,
and lists the head of the waiting queue.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from radixserve.entrypoints.dashboard_page import DASHBOARD_HTML
from radixserve.managers.io_struct import ServerInfo
from radixserve.managers.tokenizer_manager import TokenizerManager
from radixserve.server_args import ServerArgs


def load_entries(info: ServerInfo) -> list[dict[str, int]]:
    """SGLang's /get_load: one entry per data-parallel rank. `num_reqs` counts running
    and waiting requests; `num_tokens` the KV slots held (neither free nor evictable)."""
    replicas = info.extra.get("dp_replicas")
    per_rank = [ServerInfo(**r) for r in replicas] if replicas else [info]
    return [{"dp_rank": rank, "num_reqs": r.num_running_reqs + r.num_waiting_reqs,
             "num_waiting_reqs": r.num_waiting_reqs,
             "num_tokens": r.max_total_num_tokens - r.available_tokens - r.evictable_tokens}
            for rank, r in enumerate(per_rank)]


def queue_head(info: ServerInfo) -> list[dict[str, Any]]:
    """The first waiting requests of each data-parallel rank, by how long they waited."""
    replicas = info.extra.get("dp_replicas")
    per_rank = [r["extra"] for r in replicas] if replicas else [info.extra]
    head = [{**entry, "dp_rank": rank} for rank, extra in enumerate(per_rank)
            for entry in extra.get("queue_head", [])]
    return sorted(head, key=lambda e: -e["waited_s"])


def dashboard_data(info: ServerInfo, num_pending: int, metrics: dict[str, float] | None
                   ) -> dict[str, Any]:
    """One sample for the page. `metrics`: the Prometheus samples by name (prefix
    stripped), or None without --enable-metrics."""
    used = info.max_total_num_tokens - info.available_tokens - info.evictable_tokens
    data: dict[str, Any] = {
        "time": time.time(),
        "num_running_reqs": info.num_running_reqs,
        "num_queue_reqs": info.num_waiting_reqs,
        "num_pending_requests": num_pending,
        "num_used_tokens": used,
        "max_total_num_tokens": info.max_total_num_tokens,
        "token_usage": used / max(info.max_total_num_tokens, 1),
        # Every token the radix tree holds, shared prefixes counted once.
        "radix_tree_tokens": info.evictable_tokens + info.protected_tokens,
        # Counters: the page takes their differences for the interval's cache hit rate.
        "total_prefill_tokens": info.total_prefill_tokens,
        "total_cached_tokens": info.total_cached_tokens,
        "queue_head": queue_head(info),
        "metrics_enabled": metrics is not None,
        "gen_throughput": None, "ttft_sum_s": None, "ttft_count": None,
        "generation_tokens_total": None,
    }
    if metrics is not None:
        data.update(gen_throughput=metrics.get("gen_throughput", 0.0),
                    ttft_sum_s=metrics.get("time_to_first_token_seconds_sum", 0.0),
                    ttft_count=metrics.get("time_to_first_token_seconds_count", 0.0),
                    generation_tokens_total=metrics.get("generation_tokens_total", 0.0))
    return data


def scrape_metrics(prefix: str) -> dict[str, float]:
    """This server's Prometheus samples without labels' detail: summed over label sets
    (one scheduler and one API server here), bucket samples left out."""
    from prometheus_client.parser import text_string_to_metric_families

    from radixserve.metrics.prometheus_setup import render_metrics

    body, _ = render_metrics()
    out: dict[str, float] = {}
    head = f"{prefix}:"
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if not s.name.startswith(head) or s.name.endswith("_bucket"):
                continue
            name = s.name[len(head):]
            out[name] = out.get(name, 0.0) + s.value
    return out


def add_dashboard_routes(app: FastAPI, tm: TokenizerManager, server_args: ServerArgs) -> None:
    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    @app.get("/dashboard/data")
    async def data() -> dict[str, Any]:
        info = await tm.get_server_info()
        metrics = (scrape_metrics(server_args.metrics_prefix)
                   if server_args.enable_metrics else None)
        return dashboard_data(info, tm.num_pending, metrics)

    @app.get("/get_load")
    async def get_load() -> list[dict[str, int]]:
        return load_entries(await tm.get_server_info())
