"""The offline Engine's progress bar over a list of prompts (tqdm, on stderr)."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def progress_bar(total: int, disabled: bool) -> AbstractContextManager[Any]:
    """A tqdm bar counting finished requests: shown for more than one request when stderr
    is a terminal (a log file or a pipe gets no bar) and not `disabled`."""
    if disabled or total <= 1 or not sys.stderr.isatty():
        return nullcontext(_NoBar())
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req", file=sys.stderr)
