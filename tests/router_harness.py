"""Start and stop the real `sglang-router` binary (PyPI `sglang-router`) in front of
radixserve workers, for the end-to-end routing tests.

The router is started with `python -m sglang_router.launch_router`, exactly as users run
it. Its ports (HTTP and the Prometheus exporter, which otherwise binds a fixed default
that two routers, or another test, would fight over) are picked free and re-picked when
the bind still loses a race. It is ready when its /health answers and every worker it was
given is registered and healthy in its /workers list (registration runs in the
background after /health is already up).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2

from tests.conftest import LiveServer, child_pids, free_port, start_server

_ROUTER_START_TIMEOUT_S = 120
_BIND_ATTEMPTS = 3


@dataclass
class Router:
    url: str
    proc: subprocess.Popen
    log_path: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: Any) -> httpx2.Client:
        kwargs.setdefault("verify", False)  # plain http: no CA bundle to load per client
        return httpx2.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def workers(self) -> list[dict[str, Any]]:
        with self.client() as c:
            return c.get("/workers").raise_for_status().json()["workers"]

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def start_router(worker_urls: list[str], policy: str, *extra: str,
                 api_key: str | None = None, expect_workers: int | None = None) -> Router:
    """A router over `worker_urls` with `--policy policy`, ready to route once
    `expect_workers` (default: one per URL; --dp-aware lists one per DP rank) are
    healthy in its /workers list."""
    return _start(["--policy", policy, "--worker-urls", *worker_urls, *extra],
                  expect_workers or len(worker_urls), api_key)


def start_pd_router(prefills: list[tuple[str, int]], decodes: list[str], *extra: str
                    ) -> Router:
    """A prefill/decode router (`--pd-disaggregation`): each prefill server with its
    bootstrap port, then the decode servers."""
    args = ["--pd-disaggregation"]
    for url, bootstrap_port in prefills:
        args += ["--prefill", url, str(bootstrap_port)]
    for url in decodes:
        args += ["--decode", url]
    return _start([*args, *extra], len(prefills) + len(decodes), None)


def _start(args: list[str], num_workers: int, api_key: str | None) -> Router:
    for attempt in range(_BIND_ATTEMPTS):
        router = _launch(args, api_key)
        try:
            _wait_ready(router, num_workers)
            return router
        except _BindLost:
            router.stop()
            if attempt == _BIND_ATTEMPTS - 1:
                raise RuntimeError(f"router lost its port {_BIND_ATTEMPTS} times; "
                                   f"see {router.log_path}") from None
        except BaseException:
            router.stop()
            raise
    raise AssertionError("unreachable")


class _BindLost(Exception):
    pass


def _launch(args: list[str], api_key: str | None) -> Router:
    port, prometheus_port = free_port(), free_port()
    log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                            f"radixserve-test-router-{port}.log")
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(prometheus_port), "--log-level", "warn", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Router(f"http://127.0.0.1:{port}", proc, log_path, api_key)


def _wait_ready(router: Router, num_workers: int) -> None:
    deadline = time.monotonic() + _ROUTER_START_TIMEOUT_S
    while True:
        if router.proc.poll() is not None:
            tail = router.log_tail()
            if "Address already in use" in tail:
                raise _BindLost()
            raise RuntimeError(f"router exited with {router.proc.returncode}:\n{tail}")
        try:
            healthy = [w for w in router.workers() if w["is_healthy"]]
            if len(healthy) == num_workers:
                return
        except httpx2.HTTPError:
            pass  # not listening yet, or /workers not up yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"router not ready in {_ROUTER_START_TIMEOUT_S} s:\n"
                               f"{router.log_tail()}")
        time.sleep(0.3)


@dataclass
class Worker:
    """A radixserve server run as one of the router's workers."""

    live: LiveServer
    children: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.live.url

    def kill(self) -> None:
        """SIGKILL the server and its scheduler/detokenizer processes: a crashed host."""
        for pid in [self.live.proc.pid, *self.children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.live.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.live.proc.poll() is None:
            self.live.proc.send_signal(signal.SIGTERM)
            try:
                self.live.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(*args: str, log_name: str) -> Worker:
    """`start_server`, retried when its free port was taken before the server bound it."""
    for attempt in range(_BIND_ATTEMPTS):
        try:
            live = start_server(*args, log_name=f"{log_name}-{attempt}")
        except RuntimeError as exc:
            if attempt == _BIND_ATTEMPTS - 1 or not _lost_port(str(exc)):
                raise
            continue
        return Worker(live, child_pids(live.proc.pid))
    raise AssertionError("unreachable")


def _lost_port(error: str) -> bool:
    """start_server's error names its log ("... see PATH")."""
    path = error.rsplit("see ", 1)[-1]
    if not os.path.exists(path):
        return False
    with open(path, errors="replace") as f:
        return "address already in use" in f.read().lower()
