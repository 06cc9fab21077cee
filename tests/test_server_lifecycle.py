"""A worker process dying makes /health 503 and the server exit non-zero, no orphans."""

from __future__ import annotations

import os
import signal
import time

import httpx2

from tests.conftest import child_pids, pid_alive, start_server


def test_scheduler_death_is_reported_and_fatal() -> None:
    live = start_server(log_name="lifecycle")
    try:
        children = child_pids(live.proc.pid)
        scheduler = live.server_info()["worker_pids"]["scheduler"]
        assert scheduler in children
        os.kill(scheduler, signal.SIGKILL)
        saw_503 = False
        deadline = time.monotonic() + 30
        while live.proc.poll() is None and time.monotonic() < deadline:
            try:
                saw_503 |= httpx2.get(f"{live.url}/health", timeout=2).status_code == 503
            except httpx2.HTTPError:
                pass
            time.sleep(0.1)
        assert live.proc.wait(timeout=30) != 0
        assert saw_503
        time.sleep(1.5)  # the watchdog interval of the other worker
        assert not any(pid_alive(p) for p in children)
    finally:
        if live.proc.poll() is None:
            live.proc.kill()

