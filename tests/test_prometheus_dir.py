"""The metrics directory: a fresh one per launch when the user gave none; in one the user
keeps between starts, the files of stopped processes are removed (their counts would add
to this run's) and those of live processes stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radixserve.metrics import prometheus_setup
from radixserve.metrics.prometheus_setup import (prepare_multiprocess_dir,
                                                 remove_multiprocess_dir)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_kept_directory_loses_only_stopped_processes_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead, live = _dead_pid(), os.getpid()
    stale = [f"counter_{dead}.db", f"histogram_{dead}.db", f"gauge_mostrecent_{dead}.db"]
    kept = [f"counter_{live}.db", f"gauge_livesum_{live}.db", "notes.txt", "counter_x.db"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert prepare_multiprocess_dir() is None  # the user's: not ours to remove later
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_without_a_directory_each_launch_gets_a_fresh_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    path = prepare_multiprocess_dir()
    try:
        assert path is not None and os.path.isdir(path) and not os.listdir(path)
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
    finally:
        remove_multiprocess_dir(path)
    assert not os.path.exists(path)


def test_a_missing_kept_directory_is_made(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(target))
    assert prepare_multiprocess_dir() is None and target.is_dir()
    assert prometheus_setup.remove_stale_process_files(str(target)) == []
