"""Shared fixtures: ONE live server per test session (real SmolLM2, on a free port)
and one in-process Engine with the same settings, for parity checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import httpx2
import pytest

API_KEY = "test-key"
_START_TIMEOUT_S = 300


@dataclass
class LiveServer:
    url: str
    api_key: str
    proc: subprocess.Popen

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: Any) -> httpx2.Client:
        # Plain http on loopback: no CA bundle to load (which costs CPU on every client).
        kwargs.setdefault("verify", False)
        return httpx2.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def server_info(self) -> dict[str, Any]:
        with self.client() as c:
            return c.get("/get_server_info").raise_for_status().json()

    def wait_idle(self, timeout_s: float = 60) -> dict[str, Any]:
        """Wait until no request runs and every KV slot is free or evictable."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.server_info()
            idle = (info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
                    and info["num_pending_requests"] == 0)
            if idle and info["available_tokens"] + info["evictable_tokens"] \
                    == info["max_total_num_tokens"]:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle / KV leaked: {info}")
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra_args: str, log_name: str = "server",
                 env: dict[str, str] | None = None) -> LiveServer:
    """`env`: extra environment variables of the server process."""
    port = free_port()
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"radixserve-test-{log_name}-"
                            f"{port}.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "radixserve.launch_server", "--port", str(port),
         "--log-level", "warning", *extra_args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _START_TIMEOUT_S
    with httpx2.Client(verify=False, timeout=2) as poll:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
            try:
                if poll.get(f"{url}/health").status_code == 200:
                    return LiveServer(url, API_KEY, proc)
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start; see {log.name}")
            time.sleep(0.25)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def pid_alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    # The parsers change nothing for requests without tools or <think> output.
    live = start_server("--api-key", API_KEY, "--tool-call-parser", "qwen25",
                        "--reasoning-parser", "qwen3")
    children = child_pids(live.proc.pid)
    yield live
    # Clean shutdown on SIGTERM: exit 0 and no orphaned worker processes.
    live.proc.send_signal(signal.SIGTERM)
    assert live.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in children), "worker processes outlived the server"


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    from radixserve.engine import Engine

    eng = Engine()
    yield eng
    eng.shutdown()
