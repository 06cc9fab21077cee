"""SpeculativeWorker: the BatchWorker that drafts, verifies, accepts and advances.

Prefill batches run on the target as usual (the drafter mirrors them). A decode batch
becomes one verify pass: each request's drafts get KV slots after its newest token, the
target runs its newest token and the drafts as one extend, the verification keeps a
prefix of the drafts and adds one target token, and the slots of the rejected drafts go
back at once. The step's tokens come back as the first token plus `extra_token_ids`;
the accepted drafts' KV is committed here (kv_committed_len), and the output processor
gives back the KV of any that a stop condition cuts off.

Requests whose sampling reads more than the logits (logprobs, penalties, grammar masks,
an unmet min_new_tokens) make their batch a plain decode step, on the target alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixserve.configs.speculative_config import SpeculativeConfig
from radixserve.core.batch_result import BatchResult
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.mem_cache.row_tail import free_row_tail, slot_at
from radixserve.model_executor.model_runner import ModelRunner, PendingBatch
from radixserve.speculative.drafter import Drafter
from radixserve.speculative.forward_inputs import run_extend
from radixserve.speculative.verify import AcceptRule, verify_chain

# Makes room for n more KV slots (evicting cached prefixes); the scheduler's KV
# accounting owns the cache, so the worker asks through this.
MakeRoom = Callable[[int], None]


@dataclass
class VerifiedBatch(PendingBatch):
    """A decode batch whose verify pass already ran (it waited for its tokens: the next
    step's inputs depend on how many drafts were accepted)."""

    result: BatchResult | None = None


def speculates(req: Req) -> bool:
    """Whether the request's next token is a function of the raw logits alone (verify
    applies no logits processor, and draws from torch's generator, not a row's seed)."""
    sp = req.sampling_params
    return (not req.return_logprob and req.grammar is None and not req.needs_host_tokens
            and not sp.logit_bias and sp.seed is None
            and len(req.output_ids) >= sp.min_new_tokens)


class SpeculativeWorker:
    def __init__(self, target: ModelRunner, drafter: Drafter, config: SpeculativeConfig,
                 make_room: MakeRoom) -> None:
        self.target = target
        self.drafter = drafter
        self.max_drafts = config.max_drafts
        self.rule = AcceptRule(config.accept_threshold_single, config.accept_threshold_acc)
        self.make_room = make_room
        self.context_len = target.model_config.context_len

    @property
    def last_wait_s(self) -> float:
        return self.target.last_wait_s

    @last_wait_s.setter
    def last_wait_s(self, value: float) -> None:
        self.target.last_wait_s = value

    # --- the BatchWorker calls -----------------------------------------------------

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduleBatch,
                       placeholders_pending: bool = False) -> PendingBatch:
        if not batch.forward_mode.is_decode():
            pending = self.target.launch_forward(batch, placeholders_pending)
            self.drafter.on_extend(batch)
            return pending
        if all(speculates(r) for r in batch.reqs):
            budgets = self._alloc_draft_slots(batch.reqs)
            drafts = self.drafter.propose(batch.reqs, budgets)
            self._free_unused(batch.reqs, budgets, drafts)
            if any(drafts):
                return self._verify(batch, drafts)
        self.drafter.on_verified(batch.reqs, [[] for _ in batch.reqs], [0] * len(batch.reqs))
        return self.target.launch_forward(batch, placeholders_pending)

    def launch_sampling(self, pending: PendingBatch) -> None:
        if not isinstance(pending, VerifiedBatch):
            self.target.launch_sampling(pending)

    def resolve_batch(self, pending: PendingBatch) -> BatchResult:
        if not isinstance(pending, VerifiedBatch):
            return self.target.resolve_batch(pending)
        assert pending.result is not None
        return pending.result

    # --- draft → verify → accept → advance ------------------------------------------

    def _budgets(self, reqs: list[Req]) -> list[int]:
        """Drafts worth proposing per request: never past max_new_tokens or the context
        (the verify pass yields up to drafts + 1 tokens)."""
        out = []
        for r in reqs:
            room_out = r.sampling_params.max_new_tokens - len(r.output_ids) - 1
            room_ctx = self.context_len - r.seqlen - 1
            out.append(max(0, min(self.max_drafts, room_out, room_ctx)))
        return out

    def _alloc_draft_slots(self, reqs: list[Req]) -> list[int]:
        """KV slots for positions seqlen .. seqlen - 1 + budget of each request, written
        into its row; a request that cannot get them drafts nothing this step."""
        pool, alloc = self.target.req_to_token_pool, self.target.token_to_kv_pool_allocator
        budgets = self._budgets(reqs)
        pages = sum(alloc.pages_needed(r.kv_committed_len + 1, k) for r, k in zip(reqs, budgets))
        self.make_room(pages * alloc.page_size)
        for i, (r, k) in enumerate(zip(reqs, budgets)):
            if k == 0:
                continue
            # The decode step's own slot (position seqlen - 1) is allocated already.
            start = r.kv_committed_len + 1
            slots = alloc.alloc_for_seq(slot_at(pool, r.req_pool_idx, start - 1), start, k)
            if slots is None:
                budgets[i] = 0
                continue
            pool.write(r.req_pool_idx, start, slots)
        return budgets

    def _free_unused(self, reqs: list[Req], budgets: list[int],
                     drafts: list[list[int]]) -> None:
        """Slots allocated for drafts the drafter did not propose."""
        for i, (r, k, d) in enumerate(zip(reqs, budgets, drafts)):
            if len(d) < k:
                start = r.kv_committed_len + 1
                free_row_tail(self.target.req_to_token_pool,
                              self.target.token_to_kv_pool_allocator, r.req_pool_idx,
                              start + len(d), start + k)

    def _verify(self, batch: ScheduleBatch, drafts: list[list[int]]) -> VerifiedBatch:
        reqs = batch.reqs
        pool = self.target.req_to_token_pool
        starts = [r.kv_committed_len for r in reqs]
        tokens = [[r.output_ids[-1], *d] for r, d in zip(reqs, drafts)]
        slots = torch.cat([pool.read(r.req_pool_idx, s + len(t))[s:]
                           for r, s, t in zip(reqs, starts, tokens)])
        logits = run_extend(self.target, [r.req_pool_idx for r in reqs], tokens, starts,
                            slots, last_only=False)
        emitted = verify_chain(logits, reqs, drafts, self.rule)
        accepted = [len(e) - 1 for e in emitted]
        self.drafter.on_verified(reqs, drafts, accepted)
        self._advance(reqs, starts, drafts, accepted)
        result = BatchResult.tokens_only([e[0] for e in emitted])
        result.extra_token_ids = [e[1:] for e in emitted]
        return VerifiedBatch(
            future_base=self.target.future.reserve(len(reqs)), next_logits=None,
            logits=None, prompt_plan=None, top_nums=[-1] * len(reqs), result=result)

    def _advance(self, reqs: list[Req], starts: list[int], drafts: list[list[int]],
                 accepted: list[int]) -> None:
        """Keep the accepted drafts' KV, free the rejected ones' slots. (The newest
        token's own position is committed by the scheduler's launch bookkeeping, which
        follows.)"""
        pool, alloc = self.target.req_to_token_pool, self.target.token_to_kv_pool_allocator
        for r, s, d, a in zip(reqs, starts, drafts, accepted):
            keep_end = s + 1 + a  # positions [0, keep_end) keep their KV
            free_row_tail(pool, alloc, r.req_pool_idx, keep_end, s + 1 + len(d))
            r.kv_committed_len += a
            r.last_loc = slot_at(pool, r.req_pool_idx, keep_end - 1)
            r.spec_verify_ct += 1
            r.spec_accepted_drafts += a
