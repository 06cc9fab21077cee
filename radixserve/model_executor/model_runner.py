"""ModelRunner: owns the model, the KV memory and the attention backend; runs forwards.

It makes no scheduling decisions: the scheduler hands it a ScheduleBatch whose KV slots
are already allocated, and it returns sampled tokens (and logprobs when asked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from radixserve.configs.model_config import ModelConfig
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.sampler import Sampler, get_token_logprobs
from radixserve.managers.schedule_batch import Req, ScheduleBatch
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_loader.loader import load_model
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# KV budget on CPU when --max-total-tokens is not given.
_CPU_KV_BYTES = 1 << 30
_CPU_MAX_TOTAL_TOKENS = 65536


@dataclass
class BatchResult:
    next_token_ids: list[int]  # one per request (ignored for unfinished chunks)
    # Per request: logprob of the sampled token and its top-k, when asked.
    next_token_logprobs: list[tuple[float, int] | None]
    next_top_logprobs: list[list[tuple[float, int]] | None]
    # Per request: prompt logprobs computed in this forward, as (logprob, token_id) for
    # each prompt token whose logits this chunk produced, and their top-k lists.
    input_logprobs: list[list[tuple[float, int]] | None]
    input_top_logprobs: list[list[list[tuple[float, int]]] | None]


class ModelRunner:
    def __init__(self, server_args: ServerArgs, model_config: ModelConfig) -> None:
        self.server_args = server_args
        self.model_config = model_config
        self.device = torch.device(server_args.device)
        self.dtype = model_config.dtype
        self.page_size = server_args.page_size
        torch.manual_seed(server_args.random_seed)
        self.model = load_model(server_args, model_config)
        self._init_memory_pools()
        self.attn_backend = self._make_attn_backend()
        self.sampler = Sampler()
        self.cuda_graph_runner = None
        if self.device.type == "cuda" and not server_args.disable_cuda_graph:
            from radixserve.model_executor.cuda_graph_runner import CudaGraphRunner

            self.cuda_graph_runner = CudaGraphRunner(self)

    # --- memory -------------------------------------------------------------------

    def _kv_bytes_per_token(self) -> int:
        mc = self.model_config
        return MHATokenToKVPool.bytes_per_token(self.dtype, mc.num_key_value_heads, mc.head_dim,
                                                mc.num_hidden_layers)

    def _profile_max_total_tokens(self) -> int:
        if self.server_args.max_total_tokens is not None:
            return self.server_args.max_total_tokens
        per_token = self._kv_bytes_per_token()
        if self.device.type == "cpu":
            return max(self.page_size, min(_CPU_MAX_TOTAL_TOKENS, _CPU_KV_BYTES // per_token))
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # mem_fraction_static is the share of the whole GPU for weights + KV; what the
        # model already holds is part of it. The rest is left for activations/graphs.
        budget = total * self.server_args.mem_fraction_static - (total - free)
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: mem_fraction_static="
                f"{self.server_args.mem_fraction_static} of {total / 2**30:.1f} GiB is "
                f"already used by the weights; raise --mem-fraction-static")
        return int(budget // per_token)

    def _init_memory_pools(self) -> None:
        sa = self.server_args
        mc = self.model_config
        self.max_total_num_tokens = self._profile_max_total_tokens()
        self.max_total_num_tokens -= self.max_total_num_tokens % self.page_size
        if self.max_total_num_tokens < self.page_size:
            raise ValueError(f"max_total_tokens={self.max_total_num_tokens} is below one page")
        default_reqs = 256 if self.device.type == "cpu" else 1024
        self.max_running_requests = sa.max_running_requests or min(
            default_reqs, max(1, self.max_total_num_tokens // 2))
        self.max_context_len = mc.context_len
        # One spare row for the request that is being prefilled in chunks.
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1,
                                                self.max_context_len + 1, self.device)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(
            self.max_total_num_tokens, self.page_size, self.device)
        # The allocator hands out pages 1..num_pages; page 0 is the reserved padding page.
        num_slots = self.max_total_num_tokens + self.page_size - 1
        self.token_to_kv_pool = MHATokenToKVPool(
            num_slots, self.dtype, mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers,
            self.device)
        logger.info("KV cache: %d tokens (%.2f GiB), %d request slots",
                    self.max_total_num_tokens,
                    self.max_total_num_tokens * self._kv_bytes_per_token() / 2**30,
                    self.max_running_requests)

    def _make_attn_backend(self) -> AttentionBackend:
        name = self.server_args.attention_backend
        if name == "torch_native":
            from radixserve.layers.attention.torch_native import TorchNativeAttnBackend

            return TorchNativeAttnBackend()
        if name == "triton":
            from radixserve.layers.attention.triton import TritonAttnBackend

            mc = self.model_config
            return TritonAttnBackend(mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
                                     self.device, self.max_context_len)
        raise ValueError(f"unknown attention backend {name!r} (torch_native, triton)")

    # --- forward ------------------------------------------------------------------

    def build_forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        """Turn the scheduler's batch (host lists) into device tensors."""
        reqs = batch.reqs
        dev = self.device
        rows = [r.req_pool_idx for r in reqs]
        if batch.forward_mode.is_decode():
            seq_lens = [r.kv_committed_len + 1 for r in reqs]
            input_ids = [r.output_ids[-1] for r in reqs]
            positions = [s - 1 for s in seq_lens]
            fb = ForwardBatch(
                forward_mode=ForwardMode.DECODE, batch_size=len(reqs),
                input_ids=_tensor(input_ids, dev), positions=_tensor(positions, dev),
                req_pool_indices=_tensor(rows, dev), seq_lens=_tensor(seq_lens, dev),
                out_cache_loc=batch.out_cache_loc.to(dev, non_blocking=True),
                seq_lens_cpu=seq_lens, req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool=self.token_to_kv_pool, attn_backend=self.attn_backend)
            return fb
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
        return ForwardBatch(
            forward_mode=batch.forward_mode, batch_size=len(reqs),
            input_ids=_tensor(input_ids, dev), positions=_tensor(positions, dev),
            req_pool_indices=_tensor(rows, dev), seq_lens=_tensor(seq_lens, dev),
            out_cache_loc=batch.out_cache_loc.to(dev, non_blocking=True),
            seq_lens_cpu=seq_lens, req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool, attn_backend=self.attn_backend,
            extend_prefix_lens=_tensor(prefix_lens, dev), extend_seq_lens=_tensor(ext_lens, dev),
            extend_start_loc=_tensor(starts, dev), extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=ext_lens, logits_indices=_tensor(logits_rows, dev))

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states of the rows that need logits: [rows, hidden]."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(fb):
            return self.cuda_graph_runner.replay(fb)
        self.attn_backend.init_forward_metadata(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        if fb.logits_indices is not None:
            hidden = hidden[fb.logits_indices]
        return hidden

    @torch.inference_mode()
    def forward_batch_generation(self, batch: ScheduleBatch) -> BatchResult:
        fb = self.build_forward_batch(batch)
        hidden = self.forward(fb)
        logits = self.model.compute_logits(hidden)
        reqs = batch.reqs
        # Rows of `logits` that belong to each request: the last one is the next token's.
        counts = self._logits_rows_per_req(batch, fb)
        last_rows = torch.cumsum(torch.tensor(counts), 0) - 1
        next_logits = logits[last_rows.to(logits.device)] if len(counts) != logits.shape[0] \
            else logits
        info = SamplingBatchInfo.from_reqs(reqs, self.model_config.vocab_size, self.device)
        info.update_vocab_mask()  # grammar masks (overlap hook: see its docstring)
        # The sampler works on its own copy, so these stay the raw logits for logprobs.
        raw_next_logits = next_logits if any(r.return_logprob for r in reqs) else None
        next_ids = self.sampler(next_logits, info)
        return self._make_result(batch, logits, raw_next_logits, next_ids, counts)

    @staticmethod
    def _logits_rows_per_req(batch: ScheduleBatch, fb: ForwardBatch) -> list[int]:
        if batch.forward_mode.is_decode():
            return [1] * len(batch.reqs)
        return [e - _first_logprob_row(r, p, e) for r, p, e in
                zip(batch.reqs, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)]

    def _make_result(self, batch: ScheduleBatch, logits: torch.Tensor,
                     raw_next_logits: torch.Tensor | None, next_ids: torch.Tensor,
                     counts: list[int]) -> BatchResult:
        reqs = batch.reqs
        ids = next_ids.tolist()
        n = len(reqs)
        result = BatchResult(ids, [None] * n, [None] * n, [None] * n, [None] * n)
        if raw_next_logits is None:
            return result
        want = [i for i, r in enumerate(reqs) if r.return_logprob]
        lps, tops = get_token_logprobs(raw_next_logits[want], next_ids[want],
                                       [reqs[i].top_logprobs_num for i in want])
        for j, i in enumerate(want):
            result.next_token_logprobs[i] = (lps[j], ids[i])
            result.next_top_logprobs[i] = tops[j]
        if batch.forward_mode.is_decode():
            return result
        self._prompt_logprobs(batch, logits, counts, result)
        return result

    def _prompt_logprobs(self, batch: ScheduleBatch, logits: torch.Tensor, counts: list[int],
                         result: BatchResult) -> None:
        """Logprob of each prompt token given the tokens before it, for this chunk."""
        start = 0
        for i, r in enumerate(batch.reqs):
            c = counts[i]
            if _wants_prompt_logprobs(r):
                e = len(r.fill_ids) - r.kv_committed_len
                first_pos = r.kv_committed_len + e - c
                # The row at position q predicts token q + 1; only prompt tokens count.
                prompt = r.origin_input_ids
                targets = prompt[first_pos + 1:min(first_pos + c, len(prompt) - 1) + 1]
                rows = logits[start:start + len(targets)]
                lps, tops = get_token_logprobs(
                    rows, torch.tensor(targets, dtype=torch.int64, device=logits.device),
                    [r.top_logprobs_num] * len(targets)) if targets else ([], [])
                result.input_logprobs[i] = list(zip(lps, targets))
                result.input_top_logprobs[i] = tops
            start += c


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
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
