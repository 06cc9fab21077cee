"""The role seam: where a request's life differs with the server's role.

A colocated server (the default) prefills and decodes every request. Under
prefill/decode disaggregation a prefill-only server hands a request's KV to its decode
server after the prompt instead of decoding it, and a decode-only server starts from
KV it receives; those roles implement the same calls.
"""

from __future__ import annotations

from typing import Protocol

from radixserve.core.req import Req


class RequestRole(Protocol):
    def decodes_here(self, req: Req) -> bool:
        """Called once a request's prompt is fully prefilled: whether it joins this
        server's running batch."""


class ColocatedRole:
    """Prefill and decode on this server."""

    def decodes_here(self, req: Req) -> bool:
        return True
