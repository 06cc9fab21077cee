"""The Scheduler: continuous batching over the radix cache.

One step = pick a batch (a prefill of waiting requests, or a decode of the running
ones) → run it → fold the results back into the requests. The offline Engine calls
`step()` in-process; the server runs the same class in its own process
(scheduler_process.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from radixserve.configs.model_config import ModelConfig
from radixserve.constrained import GrammarManager
from radixserve.managers.io_struct import BatchTokenIDOut, ServerInfo, TokenizedGenerateReqInput
from radixserve.managers.output_builder import build_token_id_out
from radixserve.managers.schedule_batch import Req, ScheduleBatch
from radixserve.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, PrefillBudget, SchedulePolicy
from radixserve.mem_cache.chunk_cache import ChunkCache
from radixserve.mem_cache.radix_cache import RadixCache
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.model_executor.model_runner import BatchResult, ModelRunner, PendingBatch
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# new_token_ratio: the share of its remaining max_new_tokens that admission assumes a
# running request will still use. It starts high and decays while decoding goes well;
# a retraction (KV ran out) pushes it back up.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RETRACT_RATIO_STEP = 0.1
# A request whose next this-many uncached tokens are being computed by a request already
# in the prefill batch is deferred to the next batch (see InBatchPrefixes).
IN_BATCH_PREFIX_LEN = 32


class Scheduler:
    def __init__(self, server_args: ServerArgs, model_config: ModelConfig | None = None,
                 tokenizer: Any = None) -> None:
        self.server_args = server_args
        self.model_config = model_config or ModelConfig.from_server_args(server_args)
        if tokenizer is None and not server_args.skip_tokenizer_init:
            from radixserve.model_loader.tokenizer import get_tokenizer

            tokenizer = get_tokenizer(server_args)
        self.tokenizer = tokenizer
        self.model_runner = ModelRunner(server_args, self.model_config)
        mr = self.model_runner
        self.req_to_token_pool = mr.req_to_token_pool
        self.allocator = mr.token_to_kv_pool_allocator
        self.page_size = server_args.page_size
        self.max_total_num_tokens = mr.max_total_num_tokens
        self.max_running_requests = mr.max_running_requests
        self.context_len = self.model_config.context_len
        cache_cls = ChunkCache if server_args.disable_radix_cache else RadixCache
        self.tree_cache = cache_cls(self.req_to_token_pool, self.allocator, self.page_size)
        self.grammar = GrammarManager(server_args, self.tokenizer, self.model_config.vocab_size,
                                      self.model_config.eos_token_ids)
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache,
                                     not server_args.disable_radix_cache)
        chunk = server_args.chunked_prefill_size
        self.chunked_prefill_size = chunk if chunk is not None and chunk > 0 else None
        self.init_new_token_ratio = min(1.0, INIT_NEW_TOKEN_RATIO
                                        * server_args.schedule_conservativeness)
        self.new_token_ratio = self.init_new_token_ratio

        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self._rids: dict[str, Req] = {}
        # Requests with news for the detokenizer, by identity: a rejected request may
        # share its rid with a live one.
        self._to_emit: dict[int, Req] = {}
        # Overlap: the batch launched last step, processed after the next one launches.
        self.overlap = not server_args.disable_overlap_schedule and (
            self.model_runner.device.type == "cuda" or server_args.enable_cpu_overlap)
        self._in_flight: tuple[ScheduleBatch, PendingBatch] | None = None
        # Counters for /get_server_info, metrics and tests.
        self.num_retractions = 0
        self.total_prefill_tokens = 0
        self.total_cached_tokens = 0
        self.forward_ct = 0
        self.last_step_host_s = 0.0

    # --- requests in ---------------------------------------------------------------

    def validate_request(self, input_ids: list[int], max_new_tokens: int) -> None:
        """Raise ValueError for a request that can never run."""
        if not input_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(input_ids) >= self.context_len:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens, over the model's context length "
                f"of {self.context_len} (at least one token must be left to generate)")
        vocab = self.model_config.vocab_size
        bad = [t for t in input_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contains token ids outside [0, {vocab}): {bad[:5]}")
        if len(input_ids) + 1 > self.max_total_num_tokens:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens but the KV cache holds only "
                f"{self.max_total_num_tokens}; raise --max-total-tokens")

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        sp = recv.sampling_params
        req = Req(recv.rid, recv.input_ids, sp, origin_input_text=recv.input_text,
                  return_logprob=recv.return_logprob, logprob_start_len=recv.logprob_start_len,
                  top_logprobs_num=recv.top_logprobs_num, stream=recv.stream,
                  eos_token_ids=self.model_config.eos_token_ids)
        if recv.rid in self._rids:
            req.finished_reason = {"type": "abort", "status_code": 400,
                                   "message": f"duplicate request id {recv.rid!r}"}
            self._emit(req)
            return
        try:
            self.validate_request(recv.input_ids, sp.max_new_tokens)
            self.grammar.add_request(req)  # starts compiling its grammar, if any
        except ValueError as e:
            req.finished_reason = {"type": "abort", "message": str(e), "status_code": 400}
            self._emit(req)
            return
        # Never generate past the context window.
        sp.max_new_tokens = min(sp.max_new_tokens, self.context_len - len(recv.input_ids))
        if req.return_logprob and req.logprob_start_len >= 0:
            req.logprob_start_len = min(req.logprob_start_len, len(req.origin_input_ids) - 1)
            req.input_token_logprobs = []
            req.input_top_logprobs = []
            if req.logprob_start_len == 0:
                req.input_token_logprobs.append((None, req.origin_input_ids[0]))
                req.input_top_logprobs.append(None)
        self._rids[recv.rid] = req
        self.waiting_queue.append(req)

    def abort_request(self, rid: str) -> None:
        req = self._rids.get(rid)
        if req is None:
            return
        if req in self.waiting_queue:
            self.waiting_queue.remove(req)
            self._finish(req, {"type": "abort", "message": "aborted by the client"})
        else:
            # Running or mid-prefill: released at the start of the next step, outside
            # any forward that may be using its KV.
            req.to_abort = True

    # --- the loop ------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running or self.chunked_req or self._to_emit
                    or self._in_flight)

    def step(self) -> BatchTokenIDOut | None:
        """One iteration. Overlapped: launch batch N+1, then process batch N while the
        device runs N+1, so the device never waits for this Python code."""
        t0 = time.perf_counter()
        self.model_runner.last_wait_s = 0.0
        if self._in_flight is not None and self._must_drain():
            self._process(self._in_flight)
            self._in_flight = None
        self._process_aborts()
        batch = self.get_next_batch_to_run()
        launched = None
        sample_later = False
        if batch is not None:
            # Placeholders exist only while an earlier batch is still in flight.
            self.model_runner.future.pending = self._in_flight is not None
            pending = self.model_runner.launch_forward(batch)
            # A grammar row's mask needs the in-flight batch's token accepted first:
            # its sampling waits until that batch is processed below, while this
            # forward already runs on the device.
            sample_later = self._in_flight is not None and any(
                r.grammar is not None for r in batch.reqs)
            if not sample_later:
                self.model_runner.launch_sampling(pending)
            self.forward_ct += 1
            self._on_launch(batch, pending.future_base)
            launched = (batch, pending)
        if self.overlap:
            previous, self._in_flight = self._in_flight, launched
            if previous is not None:
                self._process(previous)
            if sample_later:
                self.model_runner.launch_sampling(launched[1])
        elif launched is not None:
            self._process(launched)
        out = self._collect_outputs()
        # Host time of this step, without the time spent waiting for the device.
        self.last_step_host_s = time.perf_counter() - t0 - self.model_runner.last_wait_s
        return out

    def _process(self, launched: tuple[ScheduleBatch, PendingBatch]) -> None:
        batch, pending = launched
        self.process_batch_result(batch, self.model_runner.resolve_batch(pending))

    def _must_drain(self) -> bool:
        """Cases where the next batch needs the in-flight batch's tokens on the host:
        KV may run out (retraction must see settled requests), or a running request
        samples from its exact history (penalties, grammar masks)."""
        free = self.allocator.available_size() + self.tree_cache.evictable_size()
        if self._decode_need() + len(self.running) * self.page_size > free:
            return True
        return any(r.needs_host_tokens for r in self.running)

    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        prefill = self.get_new_batch_prefill()
        if prefill is not None:
            if self.server_args.enable_mixed_chunk and self.running:
                return self._mix_with_decodes(prefill)
            return prefill
        if self.running:
            return self.update_running_batch()
        return None

    # --- prefill admission ---------------------------------------------------------

    def _running_growth(self) -> int:
        """KV the running requests are still expected to need (conservative)."""
        total = 0
        for r in self.running:
            left = min(r.sampling_params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS)
            total += int(max(left, 0) * self.new_token_ratio)
        return total

    def get_new_batch_prefill(self) -> ScheduleBatch | None:
        if not self.waiting_queue and self.chunked_req is None:
            return None
        num_running = len(self.running)
        if num_running >= self.max_running_requests and self.chunked_req is None:
            return None
        budget = PrefillBudget(
            rem_total_tokens=(self.allocator.available_size() + self.tree_cache.evictable_size()
                              - self._running_growth()),
            rem_input_tokens=self.server_args.max_prefill_tokens,
            rem_chunk_tokens=self.chunked_prefill_size, page_size=self.page_size)
        can_run: list[Req] = []
        radix = not self.server_args.disable_radix_cache
        in_batch = InBatchPrefixes()
        if self.chunked_req is not None:
            req = self.chunked_req
            self.chunked_req = None
            req.fill_ids = req.all_ids
            if not self._admit(req, budget, can_run):
                # Keep it first in line; nothing else may overtake a half-done prefill.
                self.chunked_req = req
                return None
            in_batch.add(req)
        for req in self.policy.order(self.waiting_queue):
            if self.chunked_req is not None:
                break
            if num_running + len(can_run) >= self.max_running_requests:
                break
            if not self.grammar.is_ready(req):
                continue  # its grammar is still compiling: the others go first
            req.init_next_round_input(self.tree_cache if radix else None)
            if radix and in_batch.covers(req):
                # Its prefix is being computed in this very batch: wait one round and
                # take it from the cache instead of computing it twice.
                continue
            if not self._admit(req, budget, can_run):
                break
            in_batch.add(req)
        if not can_run:
            return None
        taken = {id(r) for r in can_run}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in taken]
        out_loc = torch.cat([r.new_kv_slots for r in can_run])
        return ScheduleBatch(can_run, ForwardMode.EXTEND, out_cache_loc=out_loc)

    def _admit(self, req: Req, budget: PrefillBudget, can_run: list[Req]) -> bool:
        """Try to add `req` (fill_ids and prefix set) to the prefill batch."""
        fresh = req.req_pool_idx is None
        prefix_len = len(req.prefix_indices) if fresh else req.kv_committed_len
        extend_len = len(req.fill_ids) - prefix_len
        n = budget.chunk_len(extend_len)
        if n <= 0:
            return False
        probe_len = n if n < extend_len else extend_len
        req.extend_input_len = probe_len
        if not budget.fits(req, self.new_token_ratio) and (can_run or self.running):
            return False
        if fresh:
            self.tree_cache.inc_lock_ref(req.last_node)
            row = self.req_to_token_pool.alloc()
            if row is None:
                self.tree_cache.dec_lock_ref(req.last_node)
                return False
            req.req_pool_idx = row
            if len(req.prefix_indices):
                self.req_to_token_pool.write(row, 0, req.prefix_indices)
                req.last_loc = int(req.prefix_indices[-1])
            req.kv_committed_len = len(req.prefix_indices)
        slots = self._alloc_for_req(req, n)
        if slots is None:
            if fresh:
                self.tree_cache.dec_lock_ref(req.last_node)
                self.req_to_token_pool.free(req.req_pool_idx)
                req.req_pool_idx = None
                req.kv_committed_len = 0
            return False
        if not req._cached_tokens_set:
            req.cached_tokens = req.kv_committed_len
            req._cached_tokens_set = True
            self.total_cached_tokens += req.cached_tokens
        req.fill_ids = req.fill_ids[:req.kv_committed_len + n]
        req.is_chunked = n < extend_len
        req.new_kv_slots = slots
        budget.take(req, n, self.new_token_ratio)
        can_run.append(req)
        if req.is_chunked:
            self.chunked_req = req
        return True

    def _make_room(self, num_tokens: int) -> None:
        short = num_tokens - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)

    def _alloc_for_req(self, req: Req, n: int) -> torch.Tensor | None:
        """KV slots for the next n tokens of req, evicting cached prefixes if needed."""
        cur = req.kv_committed_len
        self._make_room(self.allocator.pages_needed(cur, n) * self.page_size)
        slots = self.allocator.alloc_for_seq(req.last_loc, cur, n)
        if slots is not None:
            self.req_to_token_pool.write(req.req_pool_idx, cur, slots)
            req.last_loc = int(slots[-1])
        return slots

    def _mix_with_decodes(self, prefill: ScheduleBatch) -> ScheduleBatch:
        """One prefill chunk and every running decode in the same forward."""
        decode = self.update_running_batch()
        if decode is None:
            return prefill
        for r in decode.reqs:  # decodes run as extends of one token here
            r.fill_ids = r.all_ids
        reqs = decode.reqs + prefill.reqs
        out_loc = torch.cat([decode.out_cache_loc, prefill.out_cache_loc])
        return ScheduleBatch(reqs, ForwardMode.MIXED, out_cache_loc=out_loc,
                             num_decode_reqs=len(decode.reqs))

    # --- decode ---------------------------------------------------------------------

    def update_running_batch(self) -> ScheduleBatch | None:
        """The running requests as one decode batch, retracting some if KV is short."""
        self._retract_until_fits()
        # Requests whose in-flight token is surely their last sit this batch out.
        reqs = [r for r in self.running if not self._reaches_limit(r)]
        if not reqs:
            return None
        self._make_room(self._decode_need())
        if self.page_size == 1:
            locs = self.allocator.alloc(len(reqs))
        else:
            locs = torch.cat([self.allocator.alloc_for_seq(r.last_loc, r.kv_committed_len, 1)
                              for r in reqs])
        # One scatter for the whole batch: a write per request would cost a device
        # copy each on the GPU.
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
        cols = torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64)
        self.req_to_token_pool.write_many(rows, cols, locs)
        for r, loc in zip(reqs, locs.tolist()):
            r.last_loc = loc
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO,
                                   self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return ScheduleBatch(list(reqs), ForwardMode.DECODE, out_cache_loc=locs)

    def _reaches_limit(self, req: Req) -> bool:
        n_out = len(req.output_ids)
        return (n_out >= req.sampling_params.max_new_tokens
                or len(req.origin_input_ids) + n_out >= self.context_len)

    def _decode_need(self) -> int:
        """KV slots the next decode step takes (one per request, or a new page each)."""
        if self.page_size == 1:
            return len(self.running)
        return sum(self.allocator.pages_needed(r.kv_committed_len, 1) for r in self.running) \
            * self.page_size

    def _retract_until_fits(self) -> None:
        while self.running:
            free = self.allocator.available_size() + self.tree_cache.evictable_size()
            if self._decode_need() <= free:
                return
            if len(self.running) == 1:
                req = self.running.pop()
                self._finish(req, {"type": "abort", "message":
                                   "out of KV cache memory for this request alone"})
                continue
            # Newest first: it has the least work to lose.
            req = self.running.pop()
            self.tree_cache.cache_finished_req(req)
            req.reset_for_retract()
            self.waiting_queue.insert(0, req)
            self.num_retractions += 1
            self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_STEP)
            logger.info("KV cache full: retracted %s (%d retractions so far)", req.rid,
                        self.num_retractions)

    # --- results --------------------------------------------------------------------

    def _on_launch(self, batch: ScheduleBatch, future_base: int) -> None:
        """Bookkeeping the next batch depends on, done as soon as this one is launched:
        KV lengths advance, prompts enter the cache, finished prefills join the running
        batch, and each request gets a placeholder for the token being sampled."""
        is_decode = batch.forward_mode.is_decode()
        out_index: list[int] = []
        chunked: list[bool] = []
        for i, req in enumerate(batch.reqs):
            prefilled = not is_decode and i >= batch.num_decode_reqs
            if prefilled:
                self.total_prefill_tokens += len(req.fill_ids) - req.kv_committed_len
                req.kv_committed_len = len(req.fill_ids)
            else:
                req.kv_committed_len += 1
            chunked.append(req.is_chunked)
            if req.is_chunked:
                self._cache_unfinished(req)
                out_index.append(-1)
                continue
            if prefilled:
                req.input_logprobs_done = True
                # Share the prompt with concurrent requests right away.
                self._cache_unfinished(req)
            if req.sampling_params.max_new_tokens == 0:
                out_index.append(-1)
                continue
            req.output_ids.append(-(future_base + i + 1))
            out_index.append(len(req.output_ids) - 1)
        batch.extra["out_index"] = out_index
        batch.extra["chunked"] = chunked
        if not is_decode:
            self.running.extend(r for r, c in zip(batch.reqs[batch.num_decode_reqs:],
                                                  chunked[batch.num_decode_reqs:])
                                if not c and r.sampling_params.max_new_tokens > 0)

    def process_batch_result(self, batch: ScheduleBatch, result: BatchResult) -> None:
        """Fold sampled tokens into their requests; finish the ones that are done."""
        is_decode = batch.forward_mode.is_decode()
        # The grammar rows that get a token below (the same tests as the loop's), whose
        # matchers all advance in one call. A grammar ends its request when it accepts
        # EOS, even under ignore_eos.
        grammar_rows = [i for i, req in enumerate(batch.reqs)
                        if req.grammar is not None and not batch.extra["chunked"][i]
                        and not req.finished() and batch.extra["out_index"][i] >= 0]
        grammar_reasons = dict(zip(grammar_rows, self.grammar.accept_tokens(
            [batch.reqs[i] for i in grammar_rows],
            [result.next_token_ids[i] for i in grammar_rows])))
        for i, req in enumerate(batch.reqs):
            if not is_decode and i >= batch.num_decode_reqs:
                self._record_prompt_logprobs(req, result, i)
            if batch.extra["chunked"][i] or req.finished():
                continue  # a chunk yields no token; a request aborted in flight drops it
            idx = batch.extra["out_index"][i]
            if idx < 0:
                self._finish(req, {"type": "length", "length": 0})
                continue
            req.output_ids[idx] = result.next_token_ids[i]
            req.num_resolved = idx + 1
            if req.return_logprob and result.next_token_logprobs[i] is not None:
                req.output_token_logprobs.append(result.next_token_logprobs[i])
                req.output_top_logprobs.append(result.next_top_logprobs[i] or [])
            reason = grammar_reasons.get(i) or self._check_finished(req, idx)
            if reason is not None:
                self._finish(req, reason)
                continue
            self._emit(req)
        self.running = [r for r in self.running if not r.finished()]

    def _cache_unfinished(self, req: Req) -> None:
        """Insert the request's KV into the tree; its row may now point at tree slots."""
        self.tree_cache.cache_unfinished_req(req)
        if len(req.prefix_indices):
            req.last_loc = int(req.prefix_indices[-1])

    def _record_prompt_logprobs(self, req: Req, result: BatchResult, i: int) -> None:
        if result.input_logprobs[i] is None or req.input_token_logprobs is None:
            return
        req.input_token_logprobs.extend(result.input_logprobs[i])
        req.input_top_logprobs.extend(result.input_top_logprobs[i])

    def _check_finished(self, req: Req, idx: int) -> dict[str, Any] | None:
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
        if n_out >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        if len(req.origin_input_ids) + n_out >= self.context_len:
            return {"type": "length", "length": n_out}
        return None

    def _finish(self, req: Req, reason: dict[str, Any]) -> None:
        req.finished_reason = reason
        # Tokens of batches still in flight are dropped: their KV is released with the
        # rest, and the device finishes writing it before any later batch reuses it.
        del req.output_ids[req.num_resolved:]
        if req.req_pool_idx is not None:
            self.tree_cache.cache_finished_req(req)
            req.req_pool_idx = None
        self._emit(req)

    def _process_aborts(self) -> None:
        aborted = {"type": "abort", "message": "aborted by the client"}
        for req, reason in self.grammar.collect_compiled():  # failed compiles
            self.waiting_queue.remove(req)
            self._finish(req, reason)
        for req in [r for r in self.running if r.to_abort]:
            self.running.remove(req)
            self._finish(req, dict(aborted))
        if self.chunked_req is not None and self.chunked_req.to_abort:
            req, self.chunked_req = self.chunked_req, None
            self._finish(req, dict(aborted))

    # --- results out ----------------------------------------------------------------

    def _emit(self, req: Req) -> None:
        self._to_emit[id(req)] = req

    def _collect_outputs(self) -> BatchTokenIDOut | None:
        if not self._to_emit:
            return None
        out = build_token_id_out(self._to_emit.values())
        for req in self._to_emit.values():
            if req.finished() and self._rids.get(req.rid) is req:
                del self._rids[req.rid]
        self._to_emit = {}
        return out

    # --- admin ----------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drop the radix cache; refused while requests hold KV."""
        if self.running or self.chunked_req or self.waiting_queue or self._in_flight:
            return False
        self.tree_cache.reset()
        return True

    def get_server_info(self) -> ServerInfo:
        return ServerInfo(
            max_total_num_tokens=self.max_total_num_tokens,
            available_tokens=self.allocator.available_size(),
            evictable_tokens=self.tree_cache.evictable_size(),
            protected_tokens=self.tree_cache.protected_size(),
            num_running_reqs=len(self.running) + (1 if self.chunked_req else 0),
            num_waiting_reqs=len(self.waiting_queue),
            num_retractions=self.num_retractions,
            total_prefill_tokens=self.total_prefill_tokens,
            total_cached_tokens=self.total_cached_tokens)


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
