"""Extend-shaped forwards over runs of tokens at given positions: the drafter's steps
and the target's verify pass. Each request contributes `tokens[i]` at positions
`starts[i]`, `starts[i] + 1`, ...; the KV of earlier positions is read through its
req_to_token row, and the new tokens' KV goes to `slots` (row positions already set)."""

from __future__ import annotations

import torch

from radixserve.core.forward_batch import ForwardBatch, ForwardMode
from radixserve.device_utils import host_to_device
from radixserve.model_executor.model_runner import ModelRunner


def run_extend(runner: ModelRunner, rows: list[int], tokens: list[list[int]],
               starts: list[int], slots: torch.Tensor, last_only: bool) -> torch.Tensor:
    """float32 logits: of every new token ([sum(len), V]), or with `last_only` of each
    request's last one ([B, V])."""
    dev = runner.device
    lens = [len(t) for t in tokens]
    offsets = [0]
    for n in lens[:-1]:
        offsets.append(offsets[-1] + n)
    flat = [t for run in tokens for t in run]
    positions = [p for s, n in zip(starts, lens) for p in range(s, s + n)]
    seq_lens = [s + n for s, n in zip(starts, lens)]

    def tensor(values: list[int]) -> torch.Tensor:
        return host_to_device(values, torch.int64, dev)

    last_rows = [o + n - 1 for o, n in zip(offsets, lens)]
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(rows), input_ids=tensor(flat),
        positions=tensor(positions), req_pool_indices=tensor(rows),
        seq_lens=tensor(seq_lens), out_cache_loc=slots.to(dev), seq_lens_cpu=seq_lens,
        req_to_token_pool=runner.req_to_token_pool, token_to_kv_pool=runner.token_to_kv_pool,
        attn_backend=runner.attn_backend, extend_prefix_lens=tensor(starts),
        extend_seq_lens=tensor(lens), extend_start_loc=tensor(offsets),
        extend_prefix_lens_cpu=list(starts), extend_seq_lens_cpu=lens,
        logits_indices=tensor(last_rows) if last_only else None)
    return runner.forward(fb)
