"""--watchdog-timeout: a step running past the timeout is reported once; the default
action dumps the stacks and ends the process non-zero."""

from __future__ import annotations

import subprocess
import sys
import time

from radixserve.managers.step_watchdog import StepWatchdog


def test_stuck_step_is_reported_once() -> None:
    stuck: list[float] = []
    dog = StepWatchdog(0.2, stuck.append)
    for _ in range(10):  # quick steps: never reported
        dog.begin()
        time.sleep(0.05)
        dog.end()
    assert stuck == []
    dog.begin()
    time.sleep(0.8)
    assert len(stuck) == 1 and stuck[0] > 0.2


def test_stuck_process_exits_non_zero_with_stacks() -> None:
    code = ("import time\nfrom radixserve.managers.step_watchdog import StepWatchdog\n"
            "dog = StepWatchdog(0.3)\ndog.begin()\ntime.sleep(60)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and time.monotonic() - start < 30
    assert "watchdog-timeout" in done.stderr and "most recent call first" in done.stderr


def test_bad_timeout_is_an_argparse_error() -> None:
    done = subprocess.run([sys.executable, "-m", "radixserve.launch_server",
                           "--watchdog-timeout", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "argument --watchdog-timeout" in done.stderr.strip().splitlines()[-1]
