"""What the prefill and decode roles need from the scheduler, as structural types (the
scheduler's parts live in managers/, a layer above this package)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from radixserve.core.req import Req

Reason = dict[str, Any]
Finish = Callable[[Req, Reason], None]


class KVHost(Protocol):
    """managers.kv_accounting.KVAccounting, as far as the roles use it."""

    req_to_token_pool: Any
    tree_cache: Any

    def claim_row(self, req: Req) -> bool: ...
    def release_row(self, req: Req) -> None: ...
    def alloc_for_req(self, req: Req, n: int) -> torch.Tensor | None: ...
    def cache_unfinished(self, req: Req) -> None: ...
    def release(self, req: Req) -> None: ...
    def discard(self, req: Req, num_tokens: int) -> None: ...


def failed(message: str, status_code: int = 500) -> Reason:
    """A request that could not be completed (the HTTP answer is `status_code`)."""
    return {"type": "abort", "status_code": status_code, "message": message}


def pages_of(slots: torch.Tensor, page_size: int) -> list[int]:
    """The pages holding a request's positions 0..len(slots)-1 (one per page_size)."""
    return (slots[::page_size] // page_size).tolist()


def check_paired(req: Req, mode: str) -> None:
    """A prefill or decode server serves only requests paired through a bootstrap room."""
    if req.bootstrap_room is None or req.bootstrap_host is None or req.bootstrap_port is None:
        raise ValueError(f"a {mode} server needs bootstrap_host, bootstrap_port and "
                         f"bootstrap_room on every request (the router sets them)")
