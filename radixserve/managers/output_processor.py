"""Output processing: fold a batch's sampled tokens into its requests, decide which
are finished, and gather each step's news for the detokenizer.

Output hooks are the seam for whatever watches requests go by (metrics, tracing,
request logs): each hook is told of every batch launched (after the scheduler's launch
bookkeeping), every batch processed and every finished request.
"""

from __future__ import annotations

from typing import Any, Protocol

from radixserve.constrained import GrammarManager
from radixserve.core.batch_result import BatchResult
from radixserve.core.req import Req
from radixserve.core import stop_regex
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.managers.io_struct import BatchTokenIDOut
from radixserve.managers.kv_accounting import KVAccounting
from radixserve.managers.output_builder import build_token_id_out


class OutputHook(Protocol):
    def on_batch_launched(self, batch: ScheduleBatch) -> None: ...
    def on_batch_processed(self, batch: ScheduleBatch, result: BatchResult) -> None: ...
    def on_request_finished(self, req: Req) -> None: ...


class OutputProcessor:
    def __init__(self, kv: KVAccounting, grammar: GrammarManager, tokenizer: Any,
                 context_len: int, live: dict[str, Req]) -> None:
        self.kv = kv
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.context_len = context_len
        # The scheduler's live requests by rid; finished ones leave it once emitted.
        self._live = live
        self.hooks: list[OutputHook] = []
        # Requests with news for the detokenizer, by identity: a rejected request may
        # share its rid with a live one.
        self._to_emit: dict[int, Req] = {}

    def launched(self, batch: ScheduleBatch) -> None:
        for hook in self.hooks:
            hook.on_batch_launched(batch)

    def process(self, batch: ScheduleBatch, result: BatchResult) -> None:
        """Fold sampled tokens into their requests; finish the ones that are done."""
        # The grammar rows that get a token below (the same tests as the loop's), whose
        # matchers all advance in one call. A grammar ends its request when it accepts
        # EOS, even under ignore_eos.
        grammar_rows = [i for i, req in enumerate(batch.reqs)
                        if req.grammar is not None and not batch.chunked[i]
                        and not req.finished() and batch.out_index[i] >= 0]
        grammar_reasons = dict(zip(grammar_rows, self.grammar.accept_tokens(
            [batch.reqs[i] for i in grammar_rows],
            [result.next_token_ids[i] for i in grammar_rows])))
        for i, req in enumerate(batch.reqs):
            if batch.is_prefill_row(i):
                self._record_prompt_logprobs(req, result, i)
            if batch.chunked[i] or req.finished():
                continue  # a chunk yields no token; a request aborted in flight drops it
            idx = batch.out_index[i]
            if idx < 0:
                # Prefill only: max_new_tokens 0, or a pooling model's request, whose
                # vector is its whole answer.
                if result.pooled is not None:
                    req.embedding = result.pooled[i]
                self.finish(req, {"type": "length", "length": 0})
                continue
            req.output_ids[idx] = result.next_token_ids[i]
            req.num_resolved = idx + 1
            if req.return_logprob and result.next_token_logprobs[i] is not None:
                req.output_token_logprobs.append(result.next_token_logprobs[i])
                req.output_top_logprobs.append(result.next_top_logprobs[i] or [])
            reason = grammar_reasons.get(i) or self.check_finished(req, idx)
            if result.extra_token_ids is not None:
                reason = self._take_extra_tokens(req, result.extra_token_ids[i], reason)
            if reason is not None:
                self.finish(req, reason)
                continue
            self.emit(req)
        for hook in self.hooks:
            hook.on_batch_processed(batch, result)

    def _take_extra_tokens(self, req: Req, tokens: list[int],
                           reason: dict[str, Any] | None) -> dict[str, Any] | None:
        """Speculative decoding: the tokens accepted after the first, up to the first one
        that ends the request; the KV of those cut off goes back (the worker committed
        it). Returns the finish reason, if any."""
        taken = 0
        while reason is None and taken < len(tokens):
            req.output_ids.append(tokens[taken])
            taken += 1
            req.num_resolved = len(req.output_ids)
            reason = self.check_finished(req, req.num_resolved - 1)
        if taken < len(tokens):
            self.kv.rollback(req, len(tokens) - taken)
        return reason

    def check_finished(self, req: Req, idx: int) -> dict[str, Any] | None:
        """Is the request done after output token `idx`? (Later entries, if any, are
        placeholders of a batch already in flight.)"""
        sp = req.sampling_params
        last = req.output_ids[idx]
        n_out = idx + 1
        if sp.stop_token_ids and last in sp.stop_token_ids:
            return {"type": "stop", "matched": last}
        if not sp.ignore_eos and last in req.eos_token_ids:
            return {"type": "stop", "matched": last}
        if sp.stop_strs and self.tokenizer is not None:
            # Each token adds at least one character, so the last (longest stop + 1)
            # tokens cover any stop string that the newest token completed.
            tail = self.tokenizer.decode(
                req.output_ids[max(0, n_out - sp.stop_str_max_len - 1):n_out],
                skip_special_tokens=sp.skip_special_tokens)
            for s in sp.stop_strs:
                if s in tail:
                    return {"type": "stop", "matched": s}
        if sp.stop_regex_strs and self.tokenizer is not None:
            # As in SGLang, "matched" is the pattern, so the detokenizer trims the text
            # only where the pattern itself occurs in it literally.
            tail = self.tokenizer.decode(
                req.output_ids[max(0, n_out - sp.stop_regex_max_len - 1):n_out],
                skip_special_tokens=sp.skip_special_tokens)
            try:
                pattern = stop_regex.first_match(sp.stop_regex_strs, tail)
            except TimeoutError:
                return {"type": "abort", "message": f"a stop_regex took over "
                        f"{stop_regex.MATCH_TIMEOUT_S} s to match; the request was ended"}
            if pattern is not None:
                return {"type": "stop", "matched": pattern}
        if n_out >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        if len(req.origin_input_ids) + n_out >= self.context_len:
            return {"type": "length", "length": n_out}
        return None

    def finish(self, req: Req, reason: dict[str, Any]) -> None:
        """End a request: it gives back all its KV and is reported once more."""
        req.finished_reason = reason
        # Tokens of batches still in flight are dropped: their KV is released with the
        # rest, and the device finishes writing it before any later batch reuses it.
        del req.output_ids[req.num_resolved:]
        self.kv.release(req)
        self.emit(req)
        for hook in self.hooks:
            hook.on_request_finished(req)

    def emit(self, req: Req) -> None:
        self._to_emit[id(req)] = req

    def has_news(self) -> bool:
        return bool(self._to_emit)

    def collect(self) -> BatchTokenIDOut | None:
        """This step's message for the detokenizer (None when there is no news)."""
        if not self._to_emit:
            return None
        out = build_token_id_out(self._to_emit.values())
        for req in self._to_emit.values():
            if req.finished() and self._live.get(req.rid) is req:
                del self._live[req.rid]
        self._to_emit = {}
        return out

    @staticmethod
    def _record_prompt_logprobs(req: Req, result: BatchResult, i: int) -> None:
        if result.input_logprobs[i] is None or req.input_token_logprobs is None:
            return
        req.input_token_logprobs.extend(result.input_logprobs[i])
        req.input_top_logprobs.extend(result.input_top_logprobs[i])
