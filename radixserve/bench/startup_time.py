"""Start-up time: from launching `radixserve` to its first answered request.

    # warm: the Triton cache of earlier starts is reused
    python -m radixserve.bench.startup_time --model-path ../shared/model_configs/qwen3-8b \\
        --load-format dummy
    # cold: an empty Triton cache
    TRITON_CACHE_DIR=$(mktemp -d) python -m radixserve.bench.startup_time ...

Every flag after the benchmark's own goes to the server. Reports, in seconds, the time
until /health answers (the workers are ready) and until a one-token /generate answers
(the first request's own compilation included), and the server's start-up log lines
(weight loading, KV cache, CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx2

# Start-up lines of the server's log worth reporting next to the times.
_STARTUP_LINES = re.compile(r"loaded .* in [\d.]+ s|KV cache: .*|captured .* CUDA graphs.*")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the server did not start in time")


def measure(server_flags: list[str], timeout_s: float) -> dict[str, object]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "radixserve.launch_server", "--port",
                                 str(port), *server_flags], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_health(url, proc, start + timeout_s)
            healthy = time.monotonic() - start
            r = httpx2.post(f"{url}/generate", timeout=timeout_s, json={
                "input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 1}})
            r.raise_for_status()
            answered = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        log.seek(0)
        lines = [m.group(0) for m in _STARTUP_LINES.finditer(log.read())]
    return {"launch_to_health_s": round(healthy, 3), "launch_to_first_answer_s": round(answered, 3),
            "startup_lines": lines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds to wait for the server and its first answer")
    parser.add_argument("--result-file", default=None)
    args, server_flags = parser.parse_known_args(argv)
    row = {"server_flags": server_flags, **measure(server_flags, args.timeout)}
    print(json.dumps(row, indent=1))
    if args.result_file:
        with open(args.result_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
