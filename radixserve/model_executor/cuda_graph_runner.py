"""CUDA graphs for decode: capture the model's decode forward, logits included, once per
batch size, then replay it with the inputs copied into the captured buffers.

A live batch of size b runs the graph of the smallest captured size >= b; the padded
rows read request row 0 with seq_len `get_cuda_graph_seq_len_fill_value()` and write
their K/V into the reserved slot 0, so they never touch live KV. With cascade
attention each size also has a graph whose attention takes a cascade plan (requests
sharing a cached prefix read it once per group), replayed when the batch has one.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from radixserve.core.forward_batch import ForwardBatch, ForwardMode, fill_decode_inputs
from radixserve.core.req import Req
from radixserve.distributed.parallel_state import TpGroup
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.cascade import CascadePlan
from radixserve.mem_cache.memory_pool import ReqToTokenPool
from radixserve.model_executor.future_tokens import FutureTokenMap

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 256


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16: dense where padding costs most."""
    sizes = [bs for bs in (1, 2, 4) if bs <= max_bs]
    sizes += list(range(8, min(max_bs, 256) + 1, 8))
    sizes += list(range(272, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


@dataclass(frozen=True)
class GraphTarget:
    """What a decode graph captures: the model and the state its forward reads. The
    model runner hands these over, so that this module does not depend on it."""

    model: torch.nn.Module
    attn_backend: AttentionBackend
    req_to_token_pool: ReqToTokenPool
    token_to_kv_pool: Any
    future: FutureTokenMap
    tp_group: TpGroup
    # M-RoPE models: decode positions are offset by each request's rope_delta.
    rope_deltas: bool = False


class CudaGraphRunner:
    """Captures at construction; `replay` runs a decode batch of up to `max_bs` requests."""

    def __init__(self, target: GraphTarget, *, max_bs: int, vocab_size: int,
                 cascade: bool) -> None:
        self.target = target
        attn_backend = target.attn_backend
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        dev = target.future.buf.device
        self.device = dev
        self.fill_seq_len = attn_backend.get_cuda_graph_seq_len_fill_value()
        # The graph's inputs: for each captured size P, a contiguous [rows, P] block at the
        # start of one flat buffer (rows in the order fill_decode_inputs writes them),
        # so that a replay fills them with one host-to-device copy. Padded columns: token
        # 0 at position 0 of request row 0, written to slot 0. With cascade attention,
        # four more rows carry a batch's cascade plan (attention/cascade.py); padded
        # columns are zeros there: no group, empty tiles.
        self.cascade = cascade
        pad = [0, 0, 0, self.fill_seq_len, 0] + [0] * (4 if self.cascade else 0)
        self.num_rows = len(pad)
        self._pad_host = torch.tensor(pad, dtype=torch.int64).view(-1, 1)
        self.pad_column = self._pad_host.to(dev)
        self._flat_inputs = self.pad_column.repeat(1, self.max_bs).view(-1)
        self._blocks = {p: self._flat_inputs[:self.num_rows * p].view(self.num_rows, p)
                        for p in self.batch_sizes}
        # Keyed by (batch size, cascade): a cascade graph of each size from 2 up (a
        # batch of one shares with no one) sits beside the plain one.
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        # Every graph writes its float32 logits into the rows of this one buffer. The
        # LM head runs inside the graph (one launch fewer, and its kernels join the
        # graph's chain); per-graph outputs would hold a [bs, vocab] tensor for each of
        # the ~70 graphs. A replay overwrites the previous one's logits: whoever keeps
        # them past the next replay must copy them (see ModelRunner.launch_forward).
        self.logits = torch.empty(self.max_bs, vocab_size, dtype=torch.float32, device=dev)
        self.pool = None
        self._batches: dict[tuple[int, bool], ForwardBatch] = {}
        attn_backend.init_cuda_graph_state(self.max_bs)
        self._capture_all()

    def _batch(self, bs: int, cascade: bool) -> ForwardBatch:
        """The captured batch of a padded size, made of views of its input block; built
        once per graph, since a replay must not pay for building it again."""
        key = (bs, cascade)
        if key not in self._batches:
            block = self._blocks[bs]
            input_ids, positions, rows, seq_lens, out_cache_loc = block[:5].unbind(0)
            self._batches[key] = ForwardBatch(
                forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=input_ids,
                positions=positions, req_pool_indices=rows, seq_lens=seq_lens,
                out_cache_loc=out_cache_loc, seq_lens_cpu=[self.fill_seq_len] * bs,
                req_to_token_pool=self.target.req_to_token_pool,
                token_to_kv_pool=self.target.token_to_kv_pool,
                attn_backend=self.target.attn_backend,
                cascade_inputs=block[5:] if cascade else None)
        return self._batches[key]

    def _keys(self) -> list[tuple[int, bool]]:
        keys = [(bs, False) for bs in self.batch_sizes]
        if self.cascade:
            keys += [(bs, True) for bs in self.batch_sizes if bs > 1]
        return keys

    @torch.inference_mode()
    def _capture_all(self) -> None:
        dev = self.device
        torch.cuda.synchronize(dev)
        free_before = torch.cuda.mem_get_info(dev)[0]
        t0 = time.perf_counter()
        # Largest first, so smaller graphs reuse the big one's memory pool.
        for i, key in enumerate(sorted(self._keys(), reverse=True)):
            self._capture(*key, warmup_runs=2 if i == 0 else 1)
        torch.cuda.synchronize(dev)
        used = (free_before - torch.cuda.mem_get_info(dev)[0]) / 2**30
        logger.info("captured %d CUDA graphs (batch 1..%d) in %.1f s using %.2f GiB",
                    len(self.graphs), self.max_bs, time.perf_counter() - t0, used)

    def _capture(self, bs: int, cascade: bool, warmup_runs: int) -> None:
        fb = self._batch(bs, cascade)
        backend = self.target.attn_backend
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm up outside the graph: kernels compile and lazily built state is made
            # on the first run. One run per batch size does that; the first graph gets a
            # second, for state that a first-ever forward creates only after it has run.
            for _ in range(warmup_runs):
                backend.init_forward_metadata_capture_cuda_graph(fb)
                self._run_model(fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        backend.init_forward_metadata_capture_cuda_graph(fb)
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            self._run_model(fb)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[bs, cascade] = graph

    def _run_model(self, fb: ForwardBatch) -> None:
        # Swapping in the tokens of the batch still in flight is part of the graph:
        # it costs the host nothing, and the padded / known ids are left as they are.
        model = self.target.model
        input_ids = self.target.future.resolve(fb.input_ids)
        # Every graph's all-reduces take the NCCL window from its start (graphs never
        # run at once): the offsets captured here are the ones every replay uses.
        self.target.tp_group.begin_forward()
        model.compute_logits(model(input_ids, fb.positions, fb), out=self.logits[:fb.batch_size])

    def _padded(self, bs: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]

    def runs_cascade(self, bs: int) -> bool:
        """Whether a decode batch of bs requests with a cascade plan can run: through a
        cascade graph, or eagerly past the largest graph."""
        return bs > self.max_bs or (self.cascade and self._padded(bs) > 1)

    def replay(self, reqs: list[Req], out_cache_loc: torch.Tensor,
               plan: CascadePlan | None) -> torch.Tensor:
        """Replay a decode batch straight from the scheduler's requests: their inputs go
        from one pinned host block into the graph's block in one copy, and the graph is
        launched before anything else is built (no ForwardBatch is made). The GPU sits
        idle through the host time before the launch unless an earlier batch is still
        running, so this path keeps that time short (docs/benchmarks.md).

        out_cache_loc: [B] host slots; plan: the batch's cascade plan (host) or None."""
        bs = len(reqs)
        padded = self._padded(bs)
        # From the caching host allocator: it holds the block until the copy that reads
        # it is done, so a later step never overwrites it in flight.
        host = torch.empty(self.num_rows, padded, dtype=torch.int64, pin_memory=True)
        fill_decode_inputs(host, reqs, out_cache_loc, plan, self.target.rope_deltas)
        if padded != bs:
            host[:, bs:] = self._pad_host
        self._blocks[padded].copy_(host, non_blocking=True)
        return self._launch(bs, padded, plan is not None)

    def _launch(self, bs: int, padded: int, cascade: bool) -> torch.Tensor:
        key = (padded, cascade)
        self.target.attn_backend.init_forward_metadata_replay_cuda_graph(self._batch(*key))
        self.graphs[key].replay()
        return self.logits[:bs]
