"""Engine.generate over a list shows a tqdm bar counting finished requests when stderr is
a terminal, none with disable_progress_bar, and none when stderr is a file."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.model_factory import make_tiny_checkpoint

CODE = """
import sys
from radixserve.engine import Engine

prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
for disabled in (False, True):
    with Engine(model_path=sys.argv[1], max_total_tokens=1024,
                disable_progress_bar=disabled) as eng:
        print(f"<start disabled={disabled}>", file=sys.stderr, flush=True)
        eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2})
        print(f"<end disabled={disabled}>", file=sys.stderr, flush=True)
"""


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start):text.index(end)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("progress"))


def test_progress_bar_on_a_terminal_only(checkpoint: Path, tmp_path: Path) -> None:
    parent, child = pty.openpty()
    # A fresh terminal is 0 columns wide, where tqdm draws nothing.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", CODE, str(checkpoint)],
                            stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    shown = _between(text, "<start disabled=False>", "<end disabled=False>")
    assert "Generating" in shown and "3/3" in shown
    assert "Generating" not in _between(text, "<start disabled=True>", "<end disabled=True>")

    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", CODE, str(checkpoint)], stderr=f,
                              stdout=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0
    assert "Generating" not in log.read_text()
