"""DisaggregationConfig: a server's role under prefill/decode disaggregation and how it
reaches its peers (the --disaggregation-* flags)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("mooncake", "nixl")


@dataclass(frozen=True)
class DisaggregationConfig:
    mode: str = "null"  # null: prefill and decode here (no disaggregation)
    bootstrap_port: int = 8998
    transfer_backend: str = "mooncake"
    ib_device: str | None = None  # RDMA device; None: the transfer engine's TCP protocol
    # The address the transfer engine announces to its peers, and the bootstrap server's
    # bind address (the HTTP server's --host).
    host: str = "127.0.0.1"
    # How long one half of a request waits for the other to reach its server: on the
    # prefill side, a prefilled request's KV for the decode server's claim; on the decode
    # side, a claim for the prefill server to have the request. Then, on the decode side,
    # how long a request waits for KV room, and for its KV to arrive.
    bootstrap_timeout_s: float = 300.0
    waiting_timeout_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return self.mode != "null"
