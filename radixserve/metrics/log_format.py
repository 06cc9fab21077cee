"""One log format for every process: time, process role, level, message."""

from __future__ import annotations

import logging

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_format(role: str) -> str:
    return f"[%(asctime)s {role}] %(levelname)s %(message)s"


def configure_logging(level: str, role: str) -> None:
    """Set the root logger of this process (the API server, a scheduler rank, the
    detokenizer) to the shared format; `role` names the process in every line."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(log_format(role), datefmt=DATE_FORMAT))
    # Replaces earlier handlers: a spawned process starts with none, and the offline
    # Engine's caller keeps its own configuration (this runs only in server processes).
    root.handlers = [handler]
