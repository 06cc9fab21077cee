"""The transfer engine that writes KV pages into a peer's memory.

Mooncake's TransferEngine (PyPI mooncake-transfer-engine): each side registers its KV
buffers with its own engine; the sender writes (local address, remote address, length)
spans into the peer named by its session id ("host:rpc_port"). Without an RDMA device it
runs its TCP protocol, which is what moves the bytes on a machine without RDMA NICs
(loopback included). Peers find each other directly ("P2PHANDSHAKE"): no metadata
server.
"""

from __future__ import annotations

import logging
import socket

from radixserve.disaggregation.kv_layout import KVBuffers

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    pass


class MooncakeTransfer:
    """One engine per server: registers the local KV buffers, writes spans to peers."""

    def __init__(self, host: str, ib_device: str | None) -> None:
        from mooncake.engine import TransferEngine

        self.host = announce_host(host)
        self.engine = TransferEngine()
        protocol = "rdma" if ib_device else "tcp"
        if self.engine.initialize(self.host, "P2PHANDSHAKE", protocol, ib_device or "") != 0:
            raise TransferError(f"mooncake TransferEngine failed to start on {self.host} "
                                f"({protocol})")
        self.session_id = f"{self.host}:{self.engine.get_rpc_port()}"

    def register(self, bufs: KVBuffers) -> None:
        for ptr, size in zip(bufs.ptrs, bufs.buffer_bytes):
            if self.engine.register_memory(ptr, size) != 0:
                raise TransferError(f"mooncake could not register {size} bytes at {ptr:#x}")

    def write(self, peer_session: str, plan: list[tuple[int, int, int]]) -> None:
        """Copy each (local, remote, length) span into the peer; returns once the peer's
        engine holds every byte (a synchronous batch write)."""
        if not plan:
            return
        src, dst, lengths = (list(col) for col in zip(*plan))
        rc = self.engine.batch_transfer_sync_write(peer_session, src, dst, lengths)
        if rc != 0:
            raise TransferError(f"writing {sum(lengths)} bytes to {peer_session} failed "
                                f"(mooncake returned {rc})")


def announce_host(bind_host: str) -> str:
    """The address peers reach this server's engine at: the bind address, or the host's
    own address when it binds every interface."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        logger.warning("could not resolve this host's address; announcing 127.0.0.1")
        return "127.0.0.1"
