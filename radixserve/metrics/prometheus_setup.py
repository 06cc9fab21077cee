"""prometheus_client across processes: the scheduler and the API server each write their
metrics to files under PROMETHEUS_MULTIPROC_DIR, and /metrics merges them.

prometheus_client picks its storage when it is first imported, so the directory must be
set in the environment before any process imports it; the launcher does that before it
spawns the workers, which inherit the variable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

from radixserve.envs import prometheus_multiproc_dir, set_prometheus_multiproc_dir

logger = logging.getLogger(__name__)

# prometheus_client's per-process files: counter_<pid>.db, gauge_<mode>_<pid>.db, ...
_PROCESS_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")


def prepare_multiprocess_dir() -> str | None:
    """Create a fresh directory and export it; returns it when this call created it (the
    caller removes it at shutdown), None when the user had set one already."""
    given = prometheus_multiproc_dir()
    if given is not None:
        os.makedirs(given, exist_ok=True)
        remove_stale_process_files(given)
        return None
    path = tempfile.mkdtemp(prefix="radixserve-prometheus-")
    set_prometheus_multiproc_dir(path)
    return path


def remove_stale_process_files(path: str) -> list[str]:
    """Delete the files of processes that no longer run (an earlier server's, in a
    directory the user keeps between starts): /metrics would otherwise add their counts
    to this run's. Files of live processes (another server sharing the directory) stay.
    Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(path)):
        match = _PROCESS_FILE.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            os.remove(os.path.join(path, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d metrics files of stopped processes from %s", len(removed),
                    path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_multiprocess_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def render_metrics() -> tuple[bytes, str]:
    """The exposition text of every process's metrics (or of this process's alone when
    no multiprocess directory is set), and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if prometheus_multiproc_dir() is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
