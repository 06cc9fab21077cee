"""FutureTokenMap: placeholders for tokens that a batch still running will sample."""

from __future__ import annotations

import torch


class FutureTokenMap:
    """Device ring buffer of sampled tokens, so that a batch can be launched before the
    previous one's tokens reach the host: the scheduler writes the placeholder
    -(slot + 1) where a token is not known yet, and `resolve` swaps in the sampled value
    on the device. Sized for two batches in flight, so a slot is never overwritten
    before the batch that reads it has run."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.size = 2 * max_batch + 2
        self.buf = torch.zeros(self.size, dtype=torch.int64, device=device)
        self.next = 0
        self.pending = False  # set by the scheduler while placeholders may be in use

    def reserve(self, n: int) -> int:
        """Slots for a batch of n requests; returns the first one."""
        if self.next + n > self.size:
            self.next = 0
        base = self.next
        self.next += n
        return base

    def store(self, base: int, ids: torch.Tensor) -> None:
        self.buf[base:base + ids.shape[0]] = ids

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = (-input_ids - 1).clamp(min=0)
        return torch.where(input_ids < 0, self.buf[slots], input_ids)
