"""ModelRunner: owns the model, the KV memory and the attention backend; runs forwards.

It makes no scheduling decisions: the scheduler hands it a ScheduleBatch whose KV slots
are already allocated, and it returns sampled tokens (and logprobs when asked). A
pooling model (embeddings, classification and reward scores: configs/pooling_config.py)
returns one vector per request instead, and samples nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from radixserve.configs.model_config import ModelConfig
from radixserve.configs.runner_config import RunnerConfig
from radixserve.constrained.xgrammar_backend import HostBitmasks
from radixserve.core.batch_result import BatchResult
from radixserve.core.forward_batch import ForwardBatch, ForwardMode, fill_decode_inputs
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.device_utils import host_to_device, to_device_async
from radixserve.distributed.parallel_state import get_tp_group, kv_heads_per_rank
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.cascade import CascadePlan, CascadePlanner
from radixserve.layers.attention.registry import AttentionSpec, create_attention_backend
from radixserve.layers.moe.ep.ep_runtime import ExpertParallelRuntime
from radixserve.layers.moe.ep.state import setup_expert_parallel
from radixserve.layers.sampler import Sampler, get_token_logprobs
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import (MHATokenToKVPool, MLATokenToKVPool,
                                              ReqToTokenPool)
from radixserve.model_executor.cuda_graph_runner import (DEFAULT_MAX_BS, CudaGraphRunner,
                                                       GraphTarget)
from radixserve.model_executor.future_tokens import FutureTokenMap
from radixserve.model_loader.loader import load_model
from radixserve.multimodal.batch import multimodal_batch, mrope_positions
from radixserve.multimodal.cache import EmbeddingCache
from radixserve.sampling.sampling_batch_info import GreedyInfoCache, SamplingBatchInfo

logger = logging.getLogger(__name__)

# KV budget on CPU when --max-total-tokens is not given.
_CPU_KV_BYTES = 1 << 30
_CPU_MAX_TOTAL_TOKENS = 65536


@dataclass
class PendingBatch:
    """A launched batch whose outputs may still be on their way from the device."""

    future_base: int  # placeholder of request i is -(future_base + i + 1)
    next_logits: torch.Tensor | None
    logits: torch.Tensor | None
    prompt_plan: list[tuple[int, list[int]] | None] | None
    top_nums: list[int]
    # (next-token logits, sampling info) until `launch_sampling` has run, then None.
    to_sample: tuple[torch.Tensor, SamplingBatchInfo] | None = None
    next_ids: torch.Tensor | None = None  # on the device
    host_ids: torch.Tensor | None = None  # pinned host copy, valid once `ready` has fired
    ready: torch.cuda.Event | None = None
    # A pooling model's [batch, dim] float32 output (then nothing is sampled).
    pooled: torch.Tensor | None = None
    pooled_host: torch.Tensor | None = None  # its host copy, valid once `ready` has fired


class ModelRunner:
    def __init__(self, config: RunnerConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = model_config.dtype
        self.page_size = config.page_size
        # This rank's share of the heads: the KV pool and the kernels see only those.
        self.tp_group = get_tp_group()
        self.num_heads = model_config.num_attention_heads // self.tp_group.size
        self.num_kv_heads = kv_heads_per_rank(model_config.num_key_value_heads,
                                              self.tp_group.size)
        torch.manual_seed(config.random_seed)
        # Expert parallelism / EPLB / the recorder: the MoE layers read their expert
        # placement while they are built (None: plain FusedMoE).
        expert_state = setup_expert_parallel(config.ep, self.tp_group,
                                             model_config.text_config, self.device)
        self.model = load_model(config.load, model_config)
        self.is_pooling = model_config.pooling is not None
        self.experts = (ExpertParallelRuntime(expert_state, self.model)
                        if expert_state is not None else None)
        self.forward_passes = 0  # DP-attention compares it across a step
        # Vision-language models: [3, T] positions for batches holding images, decode
        # positions offset by each request's rope_delta, and the encoder-output cache.
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        self.mm_cache = (EmbeddingCache(config.mm_embedding_cache_bytes)
                         if hasattr(self.model, "encode_multimodal") else None)
        self._init_memory_pools()
        self.attn_backend = self._make_attn_backend()
        self.cascade_planner = self._make_cascade_planner()
        self.sampler = Sampler()
        self._greedy_info = GreedyInfoCache()
        # Grammar bitmasks, reused across steps; pinned for asynchronous uploads.
        self._mask_buffers = HostBitmasks(pinned=self.device.type == "cuda")
        self.future = FutureTokenMap(self.max_running_requests + 1, self.device)
        self.last_wait_s = 0.0  # host time spent waiting for the device in resolve_batch
        if config.enable_symm_mem_all_reduce:
            self.tp_group.enable_symm_mem_all_reduce(self.dtype, self.device)
        elif config.enable_nccl_symm_all_reduce:
            self.tp_group.enable_nccl_window_all_reduce(self.device)
        self.cuda_graph_runner: CudaGraphRunner | None = None
        # Pooling models never decode: there is no decode step to capture.
        if self.device.type == "cuda" and not config.disable_cuda_graph and not self.is_pooling:
            target = GraphTarget(self.model, self.attn_backend, self.req_to_token_pool,
                                 self.token_to_kv_pool, self.future, self.tp_group,
                                 rope_deltas=self.uses_mrope)
            max_bs = min(config.cuda_graph_max_bs or DEFAULT_MAX_BS, self.max_running_requests)
            self.cuda_graph_runner = CudaGraphRunner(
                target, max_bs=max_bs, vocab_size=model_config.vocab_size,
                cascade=self.cascade_planner is not None)

    # --- memory -------------------------------------------------------------------

    def _kv_bytes_per_token(self) -> int:
        mc = self.model_config
        if mc.is_mla:
            return MLATokenToKVPool.bytes_per_token(self.dtype, mc.kv_lora_rank,
                                                    mc.qk_rope_head_dim, mc.num_hidden_layers)
        return MHATokenToKVPool.bytes_per_token(self.dtype, self.num_kv_heads, mc.head_dim,
                                                mc.num_hidden_layers)

    def _profile_max_total_tokens(self) -> int:
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens
        per_token = self._kv_bytes_per_token()
        if self.device.type == "cpu":
            return max(self.page_size, min(_CPU_MAX_TOTAL_TOKENS, _CPU_KV_BYTES // per_token))
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # mem_fraction_static is the share of the whole GPU for weights + KV; what the
        # model already holds is part of it. The rest is left for activations/graphs.
        budget = total * self.config.mem_fraction_static - (total - free)
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: mem_fraction_static="
                f"{self.config.mem_fraction_static} of {total / 2**30:.1f} GiB is "
                f"already used by the weights; raise --mem-fraction-static")
        return int(budget // per_token)

    def _init_memory_pools(self) -> None:
        mc = self.model_config
        # TP ranks must agree on the pool size, or their schedulers would diverge.
        self.max_total_num_tokens = self.tp_group.min_int(self._profile_max_total_tokens())
        self.max_total_num_tokens -= self.max_total_num_tokens % self.page_size
        if self.max_total_num_tokens < self.page_size:
            raise ValueError(f"max_total_tokens={self.max_total_num_tokens} is below one page")
        default_reqs = 256 if self.device.type == "cpu" else 1024
        self.max_running_requests = self.config.max_running_requests or min(
            default_reqs, max(1, self.max_total_num_tokens // 2))
        self.max_context_len = mc.context_len
        # One spare row for the request that is being prefilled in chunks.
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1,
                                                self.max_context_len + 1, self.device)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(
            self.max_total_num_tokens, self.page_size, self.device)
        # The allocator hands out pages 1..num_pages; page 0 is the reserved padding page.
        num_slots = self.max_total_num_tokens + self.page_size - 1
        if mc.is_mla:
            self.token_to_kv_pool = self._make_mla_pool(num_slots)
        else:
            self.token_to_kv_pool = MHATokenToKVPool(
                num_slots, self.dtype, self.num_kv_heads, mc.head_dim, mc.num_hidden_layers,
                self.device)
        logger.info("KV cache: %d tokens (%.2f GiB), %d request slots",
                    self.max_total_num_tokens,
                    self.max_total_num_tokens * self._kv_bytes_per_token() / 2**30,
                    self.max_running_requests)

    def _make_attn_backend(self) -> AttentionBackend:
        mc = self.model_config
        mla = ({"kv_lora_rank": mc.kv_lora_rank, "qk_rope_head_dim": mc.qk_rope_head_dim}
               if mc.is_mla else {})
        spec = AttentionSpec(self.num_heads, self.num_kv_heads, mc.head_dim, self.device,
                             self.max_context_len, **mla)
        return create_attention_backend(self.config.attention_backend, spec)

    def _make_cascade_planner(self) -> CascadePlanner | None:
        cfg, tile = self.config, self.attn_backend.cascade_tile_size
        if tile is None or cfg.disable_radix_cache or cfg.disable_cascade_attention:
            return None
        return CascadePlanner(tile)

    # --- MLA (DeepSeek): the compressed KV pool ------------------------------------

    def _make_mla_pool(self, num_slots: int) -> MLATokenToKVPool:
        mc = self.model_config
        return MLATokenToKVPool(num_slots, self.dtype, mc.kv_lora_rank, mc.qk_rope_head_dim,
                                mc.num_hidden_layers, self.device)

    # --- forward ------------------------------------------------------------------

    def build_forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        """Turn the scheduler's batch (host lists) into device tensors."""
        reqs = batch.reqs
        dev = self.device
        if batch.forward_mode.is_decode():
            # One host→device copy for the whole batch: each separate small copy costs
            # the scheduler host time, and the step's host time is what the overlapped
            # GPU waits on at small models.
            plan = self._cascade_plan(reqs)
            host = torch.empty(5 if plan is None else 5 + plan.packed.shape[0], len(reqs),
                               dtype=torch.int64)
            fill_decode_inputs(host, reqs, batch.out_cache_loc, plan, self.uses_mrope)
            seq_lens_cpu = host[3].tolist()
            packed = to_device_async(host, dev)
            input_ids, positions_d, rows_d, seq_lens, out_loc = packed[:5].unbind(0)
            return ForwardBatch(
                forward_mode=ForwardMode.DECODE, batch_size=len(reqs),
                input_ids=input_ids, positions=positions_d, req_pool_indices=rows_d,
                seq_lens=seq_lens, out_cache_loc=out_loc,
                seq_lens_cpu=seq_lens_cpu, req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool=self.token_to_kv_pool, attn_backend=self.attn_backend,
                cascade_plan=plan,
                cascade_inputs=None if plan is None else packed[5:])
        rows = [r.req_pool_idx for r in reqs]
        prefix_lens = [r.kv_committed_len for r in reqs]
        ext_lens = [len(r.fill_ids) - p for r, p in zip(reqs, prefix_lens)]
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        start = 0
        for r, p, e in zip(reqs, prefix_lens, ext_lens):
            input_ids.extend(r.fill_ids[p:])
            positions.extend(range(p, p + e))
            first = _first_logprob_row(r, p, e)
            logits_rows.extend(range(start + first, start + e))
            start += e
        seq_lens = [p + e for p, e in zip(prefix_lens, ext_lens)]
        starts = [0]
        for e in ext_lens[:-1]:
            starts.append(starts[-1] + e)
        mm, positions_d = None, None
        if self.mm_cache is not None:
            mms = [r.mm_inputs for r in reqs]
            mm = multimodal_batch(mms, prefix_lens, ext_lens, self.mm_cache)
            positions_3d = mrope_positions(mms, prefix_lens, ext_lens) if self.uses_mrope else None
            if positions_3d is not None:
                positions_d = positions_3d.to(dev, non_blocking=True)
        return ForwardBatch(
            forward_mode=batch.forward_mode, batch_size=len(reqs), mm=mm,
            input_ids=_tensor(input_ids, dev),
            positions=_tensor(positions, dev) if positions_d is None else positions_d,
            req_pool_indices=_tensor(rows, dev), seq_lens=_tensor(seq_lens, dev),
            out_cache_loc=to_device_async(batch.out_cache_loc, dev),
            seq_lens_cpu=seq_lens, req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool, attn_backend=self.attn_backend,
            extend_prefix_lens=_tensor(prefix_lens, dev), extend_seq_lens=_tensor(ext_lens, dev),
            extend_start_loc=_tensor(starts, dev), extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=ext_lens, logits_indices=_tensor(logits_rows, dev))

    def _cascade_plan(self, reqs: list[Req]) -> CascadePlan | None:
        """Shared-prefix groups for a decode batch, if it can run them (a batch that
        replays a CUDA graph needs a captured cascade graph of its size)."""
        graphs = self.cuda_graph_runner
        if self.cascade_planner is None or (graphs is not None
                                            and not graphs.runs_cascade(len(reqs))):
            return None
        return self.cascade_planner.plan([r.last_node for r in reqs])

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """float32 logits of the rows that need them: [rows, vocab], run eagerly (a
        decode batch that a CUDA graph runs goes through `replay_decode_graph`); for a
        pooling model, its pooled output [batch, dim].

        Input ids may hold placeholders for tokens an earlier, still running batch
        samples (see FutureTokenMap); they are resolved on the device."""
        if self.future.pending:
            fb.input_ids = self.future.resolve(fb.input_ids)
        self.attn_backend.init_forward_metadata(fb)
        # The last pass's all-reduce results (in the NCCL window) were all read by the
        # kernels enqueued before this one.
        self.tp_group.begin_forward()
        hidden = self.model(fb.input_ids, fb.positions, fb)
        self.forward_passes += 1
        if self.experts is not None:
            self.experts.after_pass()  # EPLB rebalances here, between passes
        if self.is_pooling:
            return self.model.pool(hidden, fb)
        if fb.logits_indices is not None:
            hidden = hidden[fb.logits_indices]
        return self.model.compute_logits(hidden)

    def replay_decode_graph(self, batch: ScheduleBatch) -> torch.Tensor | None:
        """The one graph entry point: the logits of a decode batch that a CUDA graph
        runs, launched from the host values directly; None for every other batch.
        The logits live in a buffer that the next replay overwrites."""
        graphs = self.cuda_graph_runner
        if (graphs is None or not batch.forward_mode.is_decode()
                or len(batch.reqs) > graphs.max_bs):
            return None
        return graphs.replay(batch.reqs, batch.out_cache_loc, self._cascade_plan(batch.reqs))

    @torch.inference_mode()
    def forward_batch_generation(self, batch: ScheduleBatch) -> BatchResult:
        """Run a batch and wait for its tokens (the non-overlapped path)."""
        return self.resolve_batch(self.launch_batch(batch))

    @torch.inference_mode()
    def launch_batch(self, batch: ScheduleBatch) -> PendingBatch:
        """Enqueue forward + sampling; nothing here waits for the device."""
        pending = self.launch_forward(batch)
        self.launch_sampling(pending)
        return pending

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduleBatch,
                       placeholders_pending: bool = False) -> PendingBatch:
        """Enqueue the forward and the logits; `launch_sampling` must follow.
        `placeholders_pending`: the input ids may hold placeholders of tokens that a
        batch still in flight samples (they are resolved on the device).

        The two are apart so that the host can do work between them that the sampling
        needs and the forward does not: the overlapped scheduler fills grammar masks
        there, once the previous batch's tokens are accepted, while this forward runs.
        The batch's future-token slots are reserved here, so its placeholders exist
        before its tokens are sampled.
        """
        self.future.pending = placeholders_pending
        if self.is_pooling:
            return self._launch_pooling(batch)
        logits = self.replay_decode_graph(batch)
        from_graph = logits is not None
        fb = None
        if logits is None:
            fb = self.build_forward_batch(batch)
            logits = self.forward(fb)
        reqs = batch.reqs
        # Rows of `logits` that belong to each request: the last one is the next token's.
        counts = self._logits_rows_per_req(batch, fb)
        if len(counts) != logits.shape[0]:
            last_rows = torch.cumsum(torch.tensor(counts), 0) - 1
            next_logits = logits[to_device_async(last_rows, logits.device)]
        else:
            next_logits = logits
        want_logprobs = any(r.return_logprob for r in reqs)
        if want_logprobs and from_graph:
            # Logprobs are read on the host after later forwards were launched, and a
            # CUDA graph's logits buffer is rewritten by the next replay. (The sampling
            # is always launched before the next forward, so it needs no copy.)
            logits = next_logits = logits.clone()
        return PendingBatch(
            future_base=self.future.reserve(len(reqs)),
            # The sampler works on its own copy: these stay the raw logits for logprobs.
            next_logits=next_logits if want_logprobs else None,
            logits=logits if want_logprobs else None,
            prompt_plan=self._prompt_logprob_plan(batch, counts) if want_logprobs else None,
            top_nums=[r.top_logprobs_num if r.return_logprob else -1 for r in reqs],
            to_sample=(next_logits, self._greedy_info.get(reqs, self.model_config.vocab_size,
                                                          self.device)))

    def _launch_pooling(self, batch: ScheduleBatch) -> PendingBatch:
        """A pooling model's prefill: its vectors, and no logits."""
        if batch.forward_mode.is_decode() or any(r.return_logprob for r in batch.reqs):
            raise ValueError("a pooling model runs prefills without logprobs only")
        pooled = self.forward(self.build_forward_batch(batch))
        n = len(batch.reqs)
        return PendingBatch(future_base=self.future.reserve(n), next_logits=None,
                            logits=None, prompt_plan=None, top_nums=[-1] * n, pooled=pooled)

    @torch.inference_mode()
    def launch_sampling(self, pending: PendingBatch) -> None:
        """Enqueue the sampling of a batch launched with `launch_forward`."""
        if pending.pooled is not None:
            # Nothing to sample: the rows get dummy ids, which nothing reads (a pooled
            # request ends with its prefill and leaves no placeholder).
            pending.next_ids = torch.zeros(pending.pooled.shape[0], dtype=torch.int64,
                                           device=pending.pooled.device)
            pending.host_ids = _to_host(pending.next_ids)
            pending.pooled_host = _to_host(pending.pooled)
            self._record_ready(pending)
            return
        if pending.to_sample is None:
            raise RuntimeError("this batch's tokens were already sampled")
        next_logits, info = pending.to_sample
        pending.to_sample = None
        info.update_vocab_mask(self._mask_buffers)  # every matcher is up to date by now
        # Every TP rank feeds rank 0's tokens back in, whatever its own sampler drew.
        next_ids = self.tp_group.broadcast(self.sampler(next_logits, info))
        self.future.store(pending.future_base, next_ids)
        pending.next_ids = next_ids
        pending.host_ids = _to_host(next_ids)
        self._record_ready(pending)

    def _record_ready(self, pending: PendingBatch) -> None:
        if self.device.type == "cuda":
            pending.ready = torch.cuda.Event()
            pending.ready.record()

    def resolve_batch(self, pending: PendingBatch) -> BatchResult:
        """Wait for a launched batch and turn its outputs into host values."""
        if pending.host_ids is None:
            raise RuntimeError("resolve_batch before launch_sampling")
        if pending.ready is not None:
            t0 = time.perf_counter()
            pending.ready.synchronize()
            self.last_wait_s += time.perf_counter() - t0
        ids = pending.host_ids.tolist()
        result = BatchResult.tokens_only(ids)
        if pending.pooled_host is not None:
            result.pooled = pending.pooled_host.tolist()
        if pending.next_logits is None:
            return result
        want = [i for i, k in enumerate(pending.top_nums) if k >= 0]
        lps, tops = get_token_logprobs(pending.next_logits[want], pending.next_ids[want],
                                       [pending.top_nums[i] for i in want])
        for j, i in enumerate(want):
            result.next_token_logprobs[i] = (lps[j], ids[i])
            result.next_top_logprobs[i] = tops[j]
        for i, plan in enumerate(pending.prompt_plan or []):
            if plan is None:
                continue
            row, targets = plan
            rows = pending.logits[row:row + len(targets)]
            lps, tops = get_token_logprobs(
                rows, torch.tensor(targets, dtype=torch.int64, device=rows.device),
                [pending.top_nums[i]] * len(targets)) if targets else ([], [])
            result.input_logprobs[i] = list(zip(lps, targets))
            result.input_top_logprobs[i] = tops
        return result

    @staticmethod
    def _logits_rows_per_req(batch: ScheduleBatch, fb: ForwardBatch | None) -> list[int]:
        if batch.forward_mode.is_decode():  # (fb is None only for a decode batch)
            return [1] * len(batch.reqs)
        return [e - _first_logprob_row(r, p, e) for r, p, e in
                zip(batch.reqs, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)]

    @staticmethod
    def _prompt_logprob_plan(batch: ScheduleBatch, counts: list[int]
                             ) -> list[tuple[int, list[int]] | None]:
        """Per request: (first logits row, prompt tokens those rows predict), decided at
        launch, before the scheduler moves the request on."""
        plan: list[tuple[int, list[int]] | None] = []
        start = 0
        for i, r in enumerate(batch.reqs):
            c = counts[i]
            if batch.forward_mode.is_decode() or not _wants_prompt_logprobs(r):
                plan.append(None)
            else:
                e = len(r.fill_ids) - r.kv_committed_len
                first_pos = r.kv_committed_len + e - c
                # The row at position q predicts token q + 1; only prompt tokens count.
                prompt = r.origin_input_ids
                plan.append((start, prompt[first_pos + 1:min(first_pos + c, len(prompt) - 1) + 1]))
            start += c
        return plan


def _wants_prompt_logprobs(req: Req) -> bool:
    return (req.return_logprob and req.logprob_start_len >= 0
            and not req.input_logprobs_done)


def _first_logprob_row(req: Req, prefix_len: int, ext_len: int) -> int:
    """First chunk-relative row whose logits are needed (prompt logprobs need many)."""
    if not _wants_prompt_logprobs(req):
        return ext_len - 1
    # Logits at position q predict token q + 1, so prompt logprobs from position s
    # need the logits from position s - 1 (token 0 has no logprob).
    first_pos = max(max(req.logprob_start_len, 1) - 1, prefix_len)
    return min(first_pos - prefix_len, ext_len - 1)


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return host_to_device(values, torch.int64, device)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
