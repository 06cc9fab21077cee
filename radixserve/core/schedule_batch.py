"""ScheduleBatch: the scheduler's view of one forward (its requests and new KV slots)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req


@dataclass
class ScheduleBatch:
    """A list of requests run together in one forward, and their new KV slots."""

    reqs: list[Req]
    forward_mode: ForwardMode
    # Set by the scheduler when it prepares the batch:
    out_cache_loc: torch.Tensor | None = None
    # Number of leading reqs that are decodes in a MIXED batch (0 otherwise).
    num_decode_reqs: int = 0
    # Set when the batch is launched, read when its results come back (the requests
    # may have moved on in between, under the overlap loop). Per request:
    # out_index: where in output_ids its sampled token goes, -1 for none (a prefill
    # chunk, or max_new_tokens == 0); chunked: whether this was a non-final chunk.
    out_index: list[int] = field(default_factory=list)
    chunked: list[bool] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    def is_empty(self) -> bool:
        return not self.reqs

    def is_prefill_row(self, i: int) -> bool:
        """Whether request i runs (a chunk of) its prompt in this batch."""
        return not self.forward_mode.is_decode() and i >= self.num_decode_reqs
