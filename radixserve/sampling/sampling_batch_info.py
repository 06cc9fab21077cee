"""SamplingBatchInfo: the sampling parameters of one batch as tensors on the device.

Built on the host once per batch from the requests; the Sampler then reads only
tensors, so a decode step on the GPU never waits for the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from radixserve.device_utils import host_to_device

from radixserve.constrained.xgrammar_backend import HostBitmasks, VocabMask, fill_vocab_mask
from radixserve.core.req import Req
from radixserve.sampling.penalties import PenaltyState

# Seeds are reduced into [0, 2**62) so that the sentinel -1 can never collide with one.
_SEED_MODULUS = 1 << 62
UNSEEDED = -1


@dataclass
class SamplingBatchInfo:
    """Tensors for one batch of B requests, all on the same device."""

    temperatures: torch.Tensor  # [B, 1] float32; greedy rows hold 1.0
    top_ps: torch.Tensor  # [B] float32
    # [B] int64; top-k "off" (-1 in SamplingParams) is stored as vocab_size, so that
    # "rank < top_k" is the kept set for every row without a special case.
    top_ks: torch.Tensor
    min_ps: torch.Tensor  # [B] float32
    is_all_greedy: bool  # every row has top_k == 1: the sampler is a plain argmax
    need_top_p_top_k: bool  # some sampled row has top_p < 1 or 1 < top_k < vocab_size
    need_min_p: bool  # some sampled row has min_p > 0
    # [B] int64 seeds in [0, 2**62), UNSEEDED for rows that use torch's RNG; None when
    # no row is seeded. A seeded row's sample depends only on (seed, step, probabilities).
    seeds: torch.Tensor | None
    steps: torch.Tensor | None  # [B] int64 len(output_ids); set exactly when seeds is
    seeded_rows: torch.Tensor | None  # [S] int64 indices of the seeded sampled rows
    penalties: PenaltyState | None
    # (row, token) pairs whose logit is -inf because the row has produced fewer than
    # min_new_tokens tokens and the token would end it (EOS or a stop token id).
    min_tokens_rows: torch.Tensor | None  # [N] int64
    min_tokens_cols: torch.Tensor | None  # [N] int64
    vocab_size: int
    # logit_bias: (row, token, bias) triples added to the logits; None when no row has one.
    bias_rows: torch.Tensor | None = None  # [M] int64
    bias_cols: torch.Tensor | None = None  # [M] int64
    bias_values: torch.Tensor | None = None  # [M] float32
    # Structured output: each row's xgrammar matcher (None: no grammar); None when no
    # row has one. update_vocab_mask() turns them into vocab_mask.
    grammar_matchers: list[Any] | None = None
    vocab_mask: VocabMask | None = None

    @classmethod
    def from_reqs(cls, reqs: list[Req], vocab_size: int,
                  device: torch.device | str) -> "SamplingBatchInfo":
        params = [r.sampling_params for r in reqs]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        sampled = [p for p, k in zip(params, top_ks) if k != 1]
        seeds = [UNSEEDED if p.seed is None else p.seed % _SEED_MODULUS for p in params]
        seeded_rows = [i for i, (p, k) in enumerate(zip(params, top_ks))
                       if p.seed is not None and k != 1]
        any_seeded = bool(seeded_rows)
        rows, cols = _min_tokens_blocklist(reqs, vocab_size)
        b_rows, b_cols, b_values = _logit_bias_entries(reqs)

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return host_to_device(values, dtype, device)

        return cls(
            temperatures=tensor([float(p.temperature) for p in params],
                                torch.float32).view(-1, 1),
            top_ps=tensor([float(p.top_p) for p in params], torch.float32),
            top_ks=tensor(top_ks, torch.int64),
            min_ps=tensor([float(p.min_p) for p in params], torch.float32),
            is_all_greedy=not sampled,
            need_top_p_top_k=any(p.top_p < 1.0 or 1 < p.top_k < vocab_size for p in sampled),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
            seeds=tensor(seeds, torch.int64) if any_seeded else None,
            steps=tensor([len(r.output_ids) for r in reqs], torch.int64) if any_seeded else None,
            seeded_rows=tensor(seeded_rows, torch.int64) if any_seeded else None,
            penalties=PenaltyState.from_reqs(reqs, vocab_size, device),
            min_tokens_rows=tensor(rows, torch.int64) if rows else None,
            min_tokens_cols=tensor(cols, torch.int64) if rows else None,
            vocab_size=vocab_size,
            grammar_matchers=_grammar_matchers(reqs),
            bias_rows=tensor(b_rows, torch.int64) if b_rows else None,
            bias_cols=tensor(b_cols, torch.int64) if b_rows else None,
            bias_values=tensor(b_values, torch.float32) if b_rows else None,
        )

    def update_vocab_mask(self, buffers: HostBitmasks) -> None:
        """Fill the grammar rows' allowed-token bitmask on the host and send it to the device.

        Call it after launching the forward (the host work then overlaps the device's) and
        after every row's matcher has accepted the row's newest token. The overlap
        scheduler runs one step behind on results: it must wait for step N's tokens to be
        accepted before calling this for step N + 1 (the one place that needs to sync).
        """
        if self.grammar_matchers is not None:
            self.vocab_mask = fill_vocab_mask(self.grammar_matchers, self.vocab_size,
                                              self.temperatures.device, buffers)

    @property
    def has_logits_processors(self) -> bool:
        return (self.penalties is not None or self.min_tokens_rows is not None
                or self.vocab_mask is not None or self.bias_rows is not None)

    @property
    def has_only_grammar_mask(self) -> bool:
        """The grammar mask is the batch's one logits processor: a greedy batch's tokens
        are then a masked argmax of the raw logits."""
        return (self.vocab_mask is not None and self.penalties is None
                and self.min_tokens_rows is None and self.bias_rows is None)

    def apply_logits_processors(self, logits: torch.Tensor) -> None:
        """Apply penalties, logit_bias, the min_new_tokens block and the grammar mask to
        `logits` ([B, V] float32) in place. The bias comes before the blocks, so that no
        bias can bring back a token they rule out."""
        if self.penalties is not None:
            self.penalties.apply(logits)
        if self.bias_rows is not None:
            logits.index_put_((self.bias_rows, self.bias_cols), self.bias_values,
                              accumulate=True)
        if self.min_tokens_rows is not None and self.min_tokens_cols is not None:
            logits[self.min_tokens_rows, self.min_tokens_cols] = float("-inf")
        if self.vocab_mask is not None:
            self.vocab_mask.apply(logits)


class GreedyInfoCache:
    """SamplingBatchInfo.from_reqs, with the common all-greedy batch built once per size.

    A batch whose every request is greedy with no penalty, grammar or min_new_tokens
    block left has the same info as any other such batch of its size; building it costs
    four host→device copies and list walks over the batch each step, which the
    overlapped scheduler pays in host time at every decode step.
    """

    def __init__(self) -> None:
        self._by_size: dict[int, SamplingBatchInfo] = {}

    def get(self, reqs: list[Req], vocab_size: int,
            device: torch.device | str) -> SamplingBatchInfo:
        if not all(_is_plain_greedy(r) for r in reqs):
            return SamplingBatchInfo.from_reqs(reqs, vocab_size, device)
        info = self._by_size.get(len(reqs))
        if info is None or info.vocab_size != vocab_size:
            info = SamplingBatchInfo.from_reqs(reqs, vocab_size, device)
            self._by_size[len(reqs)] = info
        return info


def _is_plain_greedy(req: Req) -> bool:
    p = req.sampling_params
    return (p.top_k == 1 and req.grammar is None and p.repetition_penalty == 1.0
            and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and len(req.output_ids) >= p.min_new_tokens and not p.logit_bias)


def _grammar_matchers(reqs: list[Req]) -> list | None:
    matchers = [r.grammar.matcher if r.grammar is not None else None for r in reqs]
    return matchers if any(m is not None for m in matchers) else None


def _logit_bias_entries(reqs: list[Req]) -> tuple[list[int], list[int], list[float]]:
    """(rows, tokens, biases) of every request's logit_bias (ids checked on admission)."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, req in enumerate(reqs):
        for token, bias in (req.sampling_params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token)
            values.append(bias)
    return rows, cols, values


def _min_tokens_blocklist(reqs: list[Req], vocab_size: int) -> tuple[list[int], list[int]]:
    """(rows, tokens) to block: every ending token of each request still under min_new_tokens.

    ignore_eos does not matter here: min_new_tokens blocks EOS regardless. Ids outside the
    vocabulary cannot be sampled anyway, so they are skipped instead of indexing out of range.
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, req in enumerate(reqs):
        params = req.sampling_params
        if len(req.output_ids) >= params.min_new_tokens:
            continue
        enders = set(itertools.chain(req.eos_token_ids, params.stop_token_ids or ()))
        valid = sorted(t for t in enders if 0 <= t < vocab_size)
        rows.extend([i] * len(valid))
        cols.extend(valid)
    return rows, cols

