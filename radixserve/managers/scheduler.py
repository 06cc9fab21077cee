"""The Scheduler: continuous batching over the radix cache.

One step = pick a batch (a prefill of waiting requests, or a decode of the running
ones) → run it → process its results into the requests. The offline Engine calls
`step()` in-process; the server runs the same class in its own process
(scheduler_process.py).

The step's parts have names and files of their own: prefill admission
(prefill_admission.py), decode batching and retraction (decode_batching.py), KV and
prefix-cache accounting (kv_accounting.py), output processing (output_processor.py).
Each optional capability enters through one seam: the worker (batch_worker.py), the
prefix cache (kv_accounting.PrefixCache), the request's role (request_role.py), the
per-request constraints (GrammarManager) and the output hooks (OutputHook).
docs/architecture.md shows them together.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from radixserve.configs.model_config import ModelConfig
from radixserve.constrained import GrammarManager
from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req
from radixserve.core.sampling_params import SamplingParams
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.managers.batch_worker import BatchWorker
from radixserve.managers.decode_batching import DecodeBatcher
from radixserve.managers.expert_record import handle_expert_record
from radixserve.managers.io_struct import (BatchTokenIDOut, ExpertDistributionReq,
                                           ExpertDistributionReqOutput, ServerInfo,
                                           TokenizedGenerateReqInput)
from radixserve.managers.kv_accounting import KVAccounting, make_prefix_cache
from radixserve.managers.output_processor import OutputProcessor
from radixserve.managers.prefill_admission import NewTokenRatio, PrefillAdmission
from radixserve.managers.request_role import RequestRole, make_role
from radixserve.managers.request_validation import ModelLimits, RequestValidator, limits_from
from radixserve.managers.schedule_policy import SchedulePolicy
from radixserve.managers.scheduler_config import SchedulerConfig
from radixserve.managers.scheduler_interface import SchedulerInterface
from radixserve.managers.scheduler_observers import attach_observers
from radixserve.managers.scheduler_stats import FinishedRequestCounter, SchedulerStats
from radixserve.model_executor.model_runner import ModelRunner, PendingBatch
from radixserve.server_args import ServerArgs
from radixserve.speculative import make_batch_worker

logger = logging.getLogger(__name__)

Launched = tuple[ScheduleBatch, PendingBatch]

# How long a step with nothing to run but requests whose KV is on its way waits for news
# (new requests are only read between steps).
_ROLE_IDLE_WAIT_S = 0.005


class Scheduler(SchedulerInterface):
    def __init__(self, server_args: ServerArgs, model_config: ModelConfig | None = None,
                 tokenizer: Any = None, dp_rank: int = 0) -> None:
        config = SchedulerConfig.from_server_args(server_args)
        load = server_args.load_config()
        self.model_config = model_config or ModelConfig.from_load_config(load)
        self.pooling = self.model_config.pooling
        if self.pooling is not None and self.pooling.bidirectional:
            # An encoder's every hidden state depends on the whole request: a cached
            # prefix or an earlier chunk would be computed without the tokens after it.
            config = dataclasses.replace(config, disable_radix_cache=True,
                                         chunked_prefill_size=None)
        self.config = config
        if tokenizer is None and not config.skip_tokenizer_init:
            from radixserve.model_loader.tokenizer import get_tokenizer

            tokenizer = get_tokenizer(load)
        self.tokenizer = tokenizer
        self.model_runner = ModelRunner(server_args.runner_config(), self.model_config)
        mr = self.model_runner
        self.max_total_num_tokens = mr.max_total_num_tokens
        self.context_len = self.model_config.context_len
        self.validator = RequestValidator(self.model_limits())
        tree_cache = make_prefix_cache(mr.req_to_token_pool, mr.token_to_kv_pool_allocator,
                                       config.page_size, config.disable_radix_cache,
                                       server_args.hicache_config(), mr.token_to_kv_pool)
        self.kv = KVAccounting(mr.req_to_token_pool, mr.token_to_kv_pool_allocator,
                               tree_cache, config.page_size)
        self.worker: BatchWorker = make_batch_worker(
            server_args.speculative_config(), mr, server_args.runner_config(),
            self.kv.make_room)
        self.grammar = GrammarManager(server_args.grammar_backend, self.tokenizer,
                                      self.model_config.vocab_size,
                                      self.model_config.eos_token_ids)
        self.stats = SchedulerStats()
        ratio = NewTokenRatio(config.init_new_token_ratio)
        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self._rids: dict[str, Req] = {}
        self.prefill = PrefillAdmission(
            config, self.kv, SchedulePolicy(config.schedule_policy, tree_cache,
                                            not config.disable_radix_cache),
            self.grammar, ratio, self.stats, mr.max_running_requests)
        self.output = OutputProcessor(self.kv, self.grammar, self.tokenizer, self.context_len,
                                      self._rids)
        self.decode = DecodeBatcher(self.kv, ratio, self.stats, self.context_len,
                                    self.output.finish)
        # Overlap: the batch launched last step, processed after the next one launches.
        self.overlap = config.overlap_on(mr.device.type)
        self._in_flight: Launched | None = None
        self.output.hooks.append(FinishedRequestCounter(self.stats))
        self.role: RequestRole = make_role(server_args.disaggregation_config(), self.kv,
                                           mr.token_to_kv_pool, config.page_size,
                                           self.output, self.abort_request)
        attach_observers(self, server_args, dp_rank)  # batch log lines, metrics

    @property
    def chunked_req(self) -> Req | None:
        return self.prefill.chunked_req

    @property
    def last_step_host_s(self) -> float:
        return self.stats.last_step_host_s

    # --- requests in ---------------------------------------------------------------

    def model_limits(self) -> ModelLimits:
        return limits_from(self.model_config, self.max_total_num_tokens)

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        try:
            # The same rules the request was already validated by before it was sent
            # (request_validation.py): a last line against what arrives over IPC.
            self.validator.check_tokenized(recv)
        except ValueError as e:
            rid = getattr(recv, "rid", None)
            if isinstance(rid, str) and rid not in self._rids:
                # Answered from a stand-in: the message's own fields cannot be trusted.
                self._reject(Req(rid, [0], SamplingParams()), str(e), getattr(e, "param", None))
            else:
                logger.warning("dropped a malformed request message: %s", e)
            return
        sp = recv.sampling_params
        if self.pooling is not None and (sp.max_new_tokens != 0 or recv.return_logprob):
            self._reject(Req(recv.rid, [0], SamplingParams()),
                         "this model returns embeddings or scores, not tokens: use "
                         "/v1/embeddings, /encode or /classify", "model")
            return
        req = Req(recv.rid, recv.input_ids, sp, origin_input_text=recv.input_text,
                  return_logprob=recv.return_logprob, logprob_start_len=recv.logprob_start_len,
                  top_logprobs_num=recv.top_logprobs_num, stream=recv.stream,
                  eos_token_ids=self.model_config.eos_token_ids, mm_inputs=recv.mm_inputs)
        req.bootstrap_host, req.bootstrap_port = recv.bootstrap_host, recv.bootstrap_port
        req.bootstrap_room = recv.bootstrap_room
        if recv.rid in self._rids:
            self._reject(req, f"duplicate request id {recv.rid!r}")
            return
        try:
            self.role.check_request(req)
        except ValueError as e:
            self._reject(req, str(e))
            return
        try:
            self.grammar.add_request(req)  # starts compiling its grammar, if any
        except ValueError as e:
            self._reject(req, str(e), getattr(e, "param", None))
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
        self.role.enqueue(req, self.waiting_queue)

    def _reject(self, req: Req, message: str, param: str | None = None) -> None:
        req.finished_reason = {"type": "abort", "status_code": 400, "message": message}
        if param is not None:
            req.finished_reason["param"] = param
        self.output.emit(req)

    def abort_request(self, rid: str, reason: dict[str, Any] | None = None) -> None:
        """`reason`: what a queued request ends with (default: the client aborted it)."""
        req = self._rids.get(rid)
        if req is None:
            return
        if req in self.waiting_queue:
            self.waiting_queue.remove(req)
            self.output.finish(req, reason or {"type": "abort",
                                               "message": "aborted by the client"})
        else:
            # Running or mid-prefill: released at the start of the next step, outside
            # any forward that may be using its KV.
            req.to_abort = True

    # --- the loop ------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running or self.chunked_req
                    or self.output.has_news() or self._in_flight or self.role.has_work())

    def step(self) -> BatchTokenIDOut | None:
        """One iteration: pick → run → process (overlapped: process the previous batch
        while the device runs the one just launched)."""
        t0 = time.perf_counter()
        self.worker.last_wait_s = 0.0
        self.running.extend(self.role.poll())
        if not (self.waiting_queue or self.running or self.chunked_req or self._in_flight
                or self.output.has_news()):
            self.role.idle_wait(_ROLE_IDLE_WAIT_S)  # only KV on its way: do not spin
        if self.overlap:
            self._step_overlapped()
        else:
            self._step_plain()
        out = self.output.collect()
        self.stats.last_step_host_s = time.perf_counter() - t0 - self.worker.last_wait_s
        return out

    def _step_plain(self) -> None:
        self._process_aborts()
        batch = self.get_next_batch_to_run()
        if batch is not None:
            pending = self._launch(batch, placeholders_pending=False)
            self.worker.launch_sampling(pending)
            self._process((batch, pending))

    def _step_overlapped(self) -> None:
        """Launch batch N+1, then process batch N while the device runs N+1, so the
        device never waits for this Python code."""
        if self._in_flight is not None and self._must_drain():
            self._process(self._in_flight)
            self._in_flight = None
        self._process_aborts()
        batch = self.get_next_batch_to_run()
        launched: Launched | None = None
        sample_later = False
        if batch is not None:
            # Placeholders exist only while an earlier batch is still in flight.
            pending = self._launch(batch, placeholders_pending=self._in_flight is not None)
            # A grammar row's mask needs the in-flight batch's token accepted first:
            # its sampling waits until that batch is processed below, while this
            # forward already runs on the device.
            sample_later = self._in_flight is not None and any(
                r.grammar is not None for r in batch.reqs)
            if not sample_later:
                self.worker.launch_sampling(pending)
            launched = (batch, pending)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._process(previous)
        if sample_later:
            self.worker.launch_sampling(launched[1])

    def _launch(self, batch: ScheduleBatch, placeholders_pending: bool) -> PendingBatch:
        pending = self.worker.launch_forward(batch, placeholders_pending)
        self._on_launch(batch, pending.future_base)
        self.output.launched(batch)
        return pending

    def _process(self, launched: Launched) -> None:
        batch, pending = launched
        self.output.process(batch, self.worker.resolve_batch(pending))
        self.running = [r for r in self.running if not r.finished()]

    def _must_drain(self) -> bool:
        """Cases where the next batch needs the in-flight batch's tokens on the host:
        KV may run out (retraction must see settled requests), or a running request
        samples from its exact history (penalties, grammar masks)."""
        need = self.kv.decode_need(self.running) + len(self.running) * self.config.page_size
        if need > self.kv.free_or_evictable():
            return True
        return any(r.needs_host_tokens for r in self.running)

    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        prefill = self.prefill.next_batch(self.waiting_queue, self.running)
        if prefill is not None:
            if self.config.enable_mixed_chunk and self.running:
                return self._mix_with_decodes(prefill)
            return prefill
        if self.running:
            return self.decode.next_batch(self.running, self.waiting_queue)
        return None

    def _mix_with_decodes(self, prefill: ScheduleBatch) -> ScheduleBatch:
        """One prefill chunk and every running decode in the same forward."""
        decode = self.decode.next_batch(self.running, self.waiting_queue)
        if decode is None:
            return prefill
        for r in decode.reqs:  # decodes run as extends of one token here
            r.fill_ids = r.all_ids
        reqs = decode.reqs + prefill.reqs
        out_loc = torch.cat([decode.out_cache_loc, prefill.out_cache_loc])
        return ScheduleBatch(reqs, ForwardMode.MIXED, out_cache_loc=out_loc,
                             num_decode_reqs=len(decode.reqs))

    def _on_launch(self, batch: ScheduleBatch, future_base: int) -> None:
        """Bookkeeping the next batch depends on, done as soon as this one is launched:
        KV lengths advance, prompts enter the cache, finished prefills join the running
        batch, and each request gets a placeholder for the token being sampled."""
        for i, req in enumerate(batch.reqs):
            prefilled = batch.is_prefill_row(i)
            if prefilled:
                self.stats.total_prefill_tokens += len(req.fill_ids) - req.kv_committed_len
                req.kv_committed_len = len(req.fill_ids)
            else:
                req.kv_committed_len += 1
            batch.chunked.append(req.is_chunked)
            if req.is_chunked:
                self.kv.cache_unfinished(req)
                batch.out_index.append(-1)
                continue
            if prefilled:
                req.input_logprobs_done = True
                # Share the prompt with concurrent requests right away.
                self.kv.cache_unfinished(req)
            if req.sampling_params.max_new_tokens == 0:
                batch.out_index.append(-1)
                continue
            req.output_ids.append(-(future_base + i + 1))
            batch.out_index.append(len(req.output_ids) - 1)
        self.running.extend(
            r for i, r in enumerate(batch.reqs)
            if batch.is_prefill_row(i) and not batch.chunked[i]
            and r.sampling_params.max_new_tokens > 0 and self.role.decodes_here(r))

    def _process_aborts(self) -> None:
        aborted = {"type": "abort", "message": "aborted by the client"}
        for req, reason in self.grammar.collect_compiled():  # failed compiles
            self.waiting_queue.remove(req)
            self.output.finish(req, reason)
        for req in [r for r in self.running if r.to_abort]:
            self.running.remove(req)
            self.output.finish(req, dict(aborted))
        req = self.prefill.chunked_req
        if req is not None and req.to_abort:
            self.prefill.chunked_req = None
            self.output.finish(req, dict(aborted))

    # --- admin ----------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drop the radix cache; refused while requests hold KV."""
        if self.running or self.chunked_req or self.waiting_queue or self._in_flight \
                or self.role.num_held():
            return False
        self.kv.tree_cache.reset()
        return True

    def expert_distribution(self, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
        """The expert-load recorder's start / stop / dump (managers/expert_record.py)."""
        return handle_expert_record(self.model_runner.experts, req)

    def _queue_head(self, n: int = 8) -> list[dict[str, Any]]:
        """The first waiting requests in arrival order (for /dashboard)."""
        now = time.perf_counter()
        return [{"rid": r.rid, "prompt_tokens": len(r.origin_input_ids),
                 "waited_s": now - r.time_received} for r in self.waiting_queue[:n]]

    def get_server_info(self) -> ServerInfo:
        cache = self.kv.tree_cache
        return ServerInfo(
            max_total_num_tokens=self.max_total_num_tokens,
            available_tokens=self.kv.allocator.available_size(),
            evictable_tokens=cache.evictable_size(),
            protected_tokens=cache.protected_size(),
            num_running_reqs=len(self.running) + (1 if self.chunked_req else 0),
            num_waiting_reqs=len(self.waiting_queue) + self.role.num_held(),
            num_retractions=self.stats.num_retractions,
            total_prefill_tokens=self.stats.total_prefill_tokens,
            total_cached_tokens=self.stats.total_cached_tokens,
            extra={**cache.tier_stats(), "queue_head": self._queue_head()},
            num_requests_total=self.stats.num_requests_total,
            num_aborted_requests_total=self.stats.num_aborted_requests_total,
            prompt_tokens_total=self.stats.prompt_tokens_total,
            generation_tokens_total=self.stats.generation_tokens_total,
            cached_tokens_total=self.stats.cached_tokens_total)
