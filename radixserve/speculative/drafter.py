"""What proposes draft tokens: the n-gram lookup, or a smaller model."""

from __future__ import annotations

from typing import Protocol

from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch


class Drafter(Protocol):
    def on_extend(self, batch: ScheduleBatch) -> None:
        """A prefill (chunk) batch was launched on the target; called before the
        scheduler's launch bookkeeping, so each request's kv_committed_len is still the
        start of its new tokens."""

    def propose(self, reqs: list[Req], budgets: list[int]) -> list[list[int]]:
        """Up to budgets[i] draft tokens for each decoding request (the tokens expected
        after its last one). The slots of positions seqlen - 1 ... seqlen - 1 + budget
        are already in each request's req_to_token row."""

    def on_verified(self, reqs: list[Req], drafts: list[list[int]],
                    accepted: list[int]) -> None:
        """The verify pass kept accepted[i] of drafts[i] (before the KV of the others
        is freed)."""
