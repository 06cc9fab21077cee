"""CUDA graphs for decode: capture the model's decode forward once per batch size, then
replay it with the inputs copied into the captured buffers.

A live batch of size b runs the graph of the smallest captured size >= b; the padded
rows read request row 0 with seq_len `get_cuda_graph_seq_len_fill_value()` and write
their K/V into the reserved slot 0, so they never touch live KV.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

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


class CudaGraphRunner:
    def __init__(self, model_runner: "ModelRunner") -> None:
        self.mr = model_runner
        sa = model_runner.server_args
        max_bs = min(sa.cuda_graph_max_bs or DEFAULT_MAX_BS, model_runner.max_running_requests)
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        dev = model_runner.device
        self.fill_seq_len = model_runner.attn_backend.get_cuda_graph_seq_len_fill_value()
        # The graph's inputs, as the rows of one buffer (the order of
        # ForwardBatch.packed_decode_inputs), so that a replay fills them in one copy.
        # Padded columns: token 0 at position 0 of request row 0, written to slot 0.
        self.pad_column = torch.tensor([0, 0, 0, self.fill_seq_len, 0], dtype=torch.int64,
                                       device=dev).view(5, 1)
        self.inputs = self.pad_column.repeat(1, self.max_bs)
        (self.input_ids, self.positions, self.req_pool_indices, self.seq_lens,
         self.out_cache_loc) = self.inputs.unbind(0)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        model_runner.attn_backend.init_cuda_graph_state(self.max_bs)
        self._capture_all()

    def _batch(self, bs: int) -> ForwardBatch:
        mr = self.mr
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs], out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=[self.fill_seq_len] * bs, req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool=mr.token_to_kv_pool, attn_backend=mr.attn_backend)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        dev = self.mr.device
        torch.cuda.synchronize(dev)
        free_before = torch.cuda.mem_get_info(dev)[0]
        t0 = time.perf_counter()
        # Largest first, so smaller graphs reuse the big one's memory pool.
        for bs in reversed(self.batch_sizes):
            self._capture(bs)
        torch.cuda.synchronize(dev)
        used = (free_before - torch.cuda.mem_get_info(dev)[0]) / 2**30
        logger.info("captured %d CUDA graphs (batch 1..%d) in %.1f s using %.2f GiB",
                    len(self.graphs), self.max_bs, time.perf_counter() - t0, used)

    def _capture(self, bs: int) -> None:
        fb = self._batch(bs)
        backend = self.mr.attn_backend
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: triton autotune / lazy init outside the graph
                backend.init_forward_metadata_capture_cuda_graph(fb)
                self._run_model(fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        backend.init_forward_metadata_capture_cuda_graph(fb)
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = self._run_model(fb)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[bs] = graph
        self.outputs[bs] = out

    def _run_model(self, fb: ForwardBatch) -> torch.Tensor:
        # Swapping in the tokens of the batch still in flight is part of the graph:
        # it costs the host nothing, and the padded / known ids are left as they are.
        input_ids = self.mr.future.resolve(fb.input_ids)
        return self.mr.model(input_ids, fb.positions, fb)

    def can_run(self, fb: ForwardBatch) -> bool:
        # Decode batches from ModelRunner.build_forward_batch carry their inputs packed;
        # a hand-built one runs eagerly.
        return (fb.forward_mode.is_decode() and fb.batch_size <= self.max_bs
                and fb.packed_decode_inputs is not None)

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        bs = fb.batch_size
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        if padded != bs:
            self.inputs[:, bs:padded].copy_(self.pad_column.expand(5, padded - bs))
        self.inputs[:, :bs].copy_(fb.packed_decode_inputs)
        self.mr.attn_backend.init_forward_metadata_replay_cuda_graph(self._batch(padded))
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]
