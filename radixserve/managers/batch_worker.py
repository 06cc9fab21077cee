"""The worker seam: what runs a scheduled batch on the device.

The scheduler launches a batch's forward, then its sampling, and later resolves its
tokens. The plain worker is the ModelRunner (one token per request per step). A
speculative worker (draft, then verify several tokens per request) takes its place
behind the same three calls, so the scheduler's step has no per-algorithm branch.
"""

from __future__ import annotations

from typing import Protocol

from radixserve.core.batch_result import BatchResult
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.model_executor.model_runner import PendingBatch


class BatchWorker(Protocol):
    # Host time spent waiting for the device in resolve_batch since the step began.
    last_wait_s: float

    def launch_forward(self, batch: ScheduleBatch,
                       placeholders_pending: bool = False) -> PendingBatch:
        """Enqueue the forward; `placeholders_pending`: the batch's input ids may hold
        placeholders of tokens a batch still in flight samples."""

    def launch_sampling(self, pending: PendingBatch) -> None:
        """Enqueue the sampling of a launched batch (grammar masks are final by now)."""

    def resolve_batch(self, pending: PendingBatch) -> BatchResult:
        """Wait for the batch's tokens and return them as host values."""
