"""Prefill admission: which waiting requests join the next prefill batch, and how
much of each (chunked prefill), within the KV and token budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.constrained import GrammarManager
from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.managers.kv_accounting import KVAccounting
from radixserve.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, PrefillBudget, SchedulePolicy
from radixserve.managers.scheduler_config import SchedulerConfig
from radixserve.managers.scheduler_stats import SchedulerStats

# A request whose next this-many uncached tokens are being computed by a request already
# in the prefill batch is deferred to the next batch (see InBatchPrefixes).
IN_BATCH_PREFIX_LEN = 32


@dataclass
class NewTokenRatio:
    """The share of its remaining max_new_tokens that admission assumes a running
    request will still use. It starts high and decays while decoding goes well; a
    retraction (KV ran out) pushes it back up."""

    init: float
    value: float = -1.0

    MIN = 0.1
    DECAY = 0.001
    RETRACT_STEP = 0.1

    def __post_init__(self) -> None:
        if self.value < 0:
            self.value = self.init

    def decay(self) -> None:
        self.value = max(self.MIN, self.value - self.DECAY)

    def on_retract(self) -> None:
        self.value = min(1.0, self.value + self.RETRACT_STEP)


@dataclass
class PrefillAdmission:
    """Builds prefill batches from the waiting queue. Holds the request whose prompt is
    being prefilled over several chunks (`chunked_req`): it goes first every time."""

    config: SchedulerConfig
    kv: KVAccounting
    policy: SchedulePolicy
    grammar: GrammarManager
    ratio: NewTokenRatio
    stats: SchedulerStats
    max_running_requests: int
    chunked_req: Req | None = None

    def next_batch(self, waiting: list[Req], running: list[Req]) -> ScheduleBatch | None:
        """A prefill batch, taking its requests out of `waiting`; None if none fits."""
        if not waiting and self.chunked_req is None:
            return None
        num_running = len(running)
        if num_running >= self.max_running_requests and self.chunked_req is None:
            return None
        budget = PrefillBudget(
            rem_total_tokens=self.kv.free_or_evictable() - self._running_growth(running),
            rem_input_tokens=self.config.max_prefill_tokens,
            rem_chunk_tokens=self.config.chunked_prefill_size, page_size=self.config.page_size)
        can_run: list[Req] = []
        radix = not self.config.disable_radix_cache
        in_batch = InBatchPrefixes()
        busy = bool(running)
        if self.chunked_req is not None:
            req = self.chunked_req
            self.chunked_req = None
            req.fill_ids = req.all_ids
            if not self._admit(req, budget, can_run, busy):
                # Keep it first in line; nothing else may overtake a half-done prefill.
                self.chunked_req = req
                return None
            in_batch.add(req)
        for req in self.policy.order(waiting):
            if self.chunked_req is not None:
                break
            if num_running + len(can_run) >= self.max_running_requests:
                break
            if not self.grammar.is_ready(req):
                continue  # its grammar is still compiling: the others go first
            req.init_next_round_input(self.kv.tree_cache if radix else None)
            if radix and in_batch.covers(req):
                # Its prefix is being computed in this very batch: wait one round and
                # take it from the cache instead of computing it twice.
                continue
            if not self._admit(req, budget, can_run, busy):
                break
            in_batch.add(req)
        if not can_run:
            return None
        taken = {id(r) for r in can_run}
        waiting[:] = [r for r in waiting if id(r) not in taken]
        out_loc = torch.cat([r.new_kv_slots for r in can_run])
        return ScheduleBatch(can_run, ForwardMode.EXTEND, out_cache_loc=out_loc)

    def _running_growth(self, running: list[Req]) -> int:
        """KV the running requests are still expected to need (conservative)."""
        total = 0
        for r in running:
            left = min(r.sampling_params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS)
            total += int(max(left, 0) * self.ratio.value)
        return total

    def _admit(self, req: Req, budget: PrefillBudget, can_run: list[Req], busy: bool) -> bool:
        """Try to add `req` (fill_ids and prefix set) to the prefill batch; `busy`:
        requests are running (then a request that may outgrow the KV waits)."""
        fresh = req.req_pool_idx is None
        if fresh:
            self.kv.load_back(req)
        prefix_len = len(req.prefix_indices) if fresh else req.kv_committed_len
        extend_len = len(req.fill_ids) - prefix_len
        n = budget.chunk_len(extend_len)
        if n <= 0:
            return False
        req.extend_input_len = n if n < extend_len else extend_len
        if not budget.fits(req, self.ratio.value) and (can_run or busy):
            return False
        if fresh and not self.kv.claim_row(req):
            return False
        slots = self.kv.alloc_for_req(req, n)
        if slots is None:
            if fresh:
                self.kv.release_row(req)
            return False
        if not req._cached_tokens_set:
            req.cached_tokens = req.kv_committed_len
            req._cached_tokens_set = True
            self.stats.total_cached_tokens += req.cached_tokens
        req.fill_ids = req.fill_ids[:req.kv_committed_len + n]
        req.is_chunked = n < extend_len
        req.new_kv_slots = slots
        budget.take(req, n, self.ratio.value)
        can_run.append(req)
        if req.is_chunked:
            self.chunked_req = req
        return True


class InBatchPrefixes:
    """The tokens that the requests admitted to a prefill batch will have in the cache once
    it runs, so that a request sharing them waits a round instead of computing them too.

    A request is covered when a batch-mate on the same path (same leading tokens) also
    holds the next IN_BATCH_PREFIX_LEN tokens after the request's cached prefix. Looking
    from the request's own cached boundary, not from token 0, also covers a follower whose
    cached part ends where an earlier chunk of the shared prefix ended.
    """

    def __init__(self) -> None:
        # By leading tokens, so that only requests on the same path are compared.
        self._by_head: dict[tuple[int, ...], list[Req]] = {}

    def add(self, req: Req) -> None:
        if len(req.fill_ids) > IN_BATCH_PREFIX_LEN:
            head = tuple(req.fill_ids[:IN_BATCH_PREFIX_LEN])
            self._by_head.setdefault(head, []).append(req)

    def covers(self, req: Req) -> bool:
        ids = req.fill_ids
        start = len(req.prefix_indices)
        end = start + IN_BATCH_PREFIX_LEN
        if len(ids) <= end:
            return False  # too little left to share to be worth a round's wait
        window = ids[start:end]
        for mate in self._by_head.get(tuple(ids[:IN_BATCH_PREFIX_LEN]), ()):
            m = mate.fill_ids  # as admitted: ends where its chunk ends
            if len(m) >= end and m[start] == ids[start] and m[start:end] == window:
                return True
        return False
