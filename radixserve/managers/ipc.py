"""Plumbing shared by the server's processes: ZMQ endpoints, sockets, parent watchdog."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import zmq

logger = logging.getLogger(__name__)


@dataclass
class PortArgs:
    """ZMQ ipc endpoints, all inside one private temp dir (mode 0700)."""

    ipc_dir: str
    tokenizer_ipc: str  # detokenizer + scheduler replies -> TokenizerManager
    scheduler_input_ipc: str  # TokenizerManager -> scheduler
    detokenizer_ipc: str  # scheduler -> detokenizer

    @classmethod
    def create(cls) -> "PortArgs":
        ipc_dir = tempfile.mkdtemp(prefix="radixserve-")
        return cls(
            ipc_dir=ipc_dir,
            tokenizer_ipc=f"ipc://{ipc_dir}/tokenizer",
            scheduler_input_ipc=f"ipc://{ipc_dir}/scheduler",
            detokenizer_ipc=f"ipc://{ipc_dir}/detokenizer",
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def zmq_socket(context: zmq.Context, socket_type: int, endpoint: str,
               bind: bool) -> zmq.Socket:
    socket = context.socket(socket_type)
    # Unbounded queues: a PUSH must never drop or block on a burst of requests.
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, 0)
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    return socket


class Malformed:
    """What `decode_message` gives for bytes that do not unpickle: logged, then ignored."""

    def __repr__(self) -> str:
        return "<malformed message>"


MALFORMED = Malformed()


def decode_message(frame: bytes) -> object:
    """A message from its pickled bytes, or MALFORMED (never raises): one garbled frame
    must not end the process that reads it. The sockets live in a private directory
    (PortArgs), so what arrives is our own processes' output, not a stranger's."""
    try:
        return pickle.loads(frame)
    except Exception as exc:  # truncated, garbage, or a class this process lacks
        logger.warning("dropped a message that does not unpickle: %r", exc)
        return MALFORMED


def recv_message(socket: zmq.Socket, flags: int = 0) -> object:
    """recv_pyobj that answers MALFORMED instead of raising on bad bytes."""
    return decode_message(socket.recv(flags))


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Exit this process once its parent is gone, even if the parent was SIGKILLed
    (daemon processes are only reaped when the parent exits normally)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
