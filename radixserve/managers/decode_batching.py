"""Decode batching: the running requests as one decode batch, retracting the newest
back to the waiting queue when the KV cache cannot hold the next step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.managers.kv_accounting import KVAccounting
from radixserve.managers.prefill_admission import NewTokenRatio
from radixserve.managers.scheduler_stats import SchedulerStats

logger = logging.getLogger(__name__)

FinishFn = Callable[[Req, dict[str, Any]], None]


@dataclass
class DecodeBatcher:
    kv: KVAccounting
    ratio: NewTokenRatio
    stats: SchedulerStats
    context_len: int
    finish: FinishFn  # ends a request that cannot run even alone

    def next_batch(self, running: list[Req], waiting: list[Req]) -> ScheduleBatch | None:
        """A decode batch of `running`, after retracting (into `waiting`) what does not
        fit; requests whose in-flight token is surely their last sit it out."""
        self.retract_until_fits(running, waiting)
        reqs = [r for r in running if not self.reaches_limit(r)]
        if not reqs:
            return None
        locs = self.kv.alloc_decode(reqs)
        self.ratio.decay()
        return ScheduleBatch(reqs, ForwardMode.DECODE, out_cache_loc=locs)

    def reaches_limit(self, req: Req) -> bool:
        n_out = len(req.output_ids)
        return (n_out >= req.sampling_params.max_new_tokens
                or len(req.origin_input_ids) + n_out >= self.context_len)

    def retract_until_fits(self, running: list[Req], waiting: list[Req]) -> None:
        while running:
            if self.kv.decode_need(running) <= self.kv.free_or_evictable():
                return
            req = running.pop()  # newest first: it has the least work to lose
            if not running:
                self.finish(req, {"type": "abort", "message":
                                   "out of KV cache memory for this request alone"})
                continue
            self.kv.release(req)
            req.reset_for_retract()
            waiting.insert(0, req)
            self.stats.num_retractions += 1
            self.ratio.on_retract()
            logger.info("KV cache full: retracted %s (%d retractions so far)", req.rid,
                        self.stats.num_retractions)
