"""Repetition, frequency and presence penalties for a batch, as dense [B, V] tensors.

Semantics follow the OpenAI API as SGLang and vLLM implement it:

* repetition_penalty r: for every token seen in the prompt or the output, a positive
  logit is divided by r and a negative one multiplied by r (so r > 1 always discourages);
* frequency_penalty f: subtract f * (times the token occurs in the output);
* presence_penalty p: subtract p once if the token occurs in the output at all.

The repetition penalty is applied first, then the two additive ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from radixserve.device_utils import host_to_device, to_device_async

from radixserve.core.req import Req


@dataclass
class PenaltyState:
    """The penalty parameters and token statistics of one batch; None fields are unused."""

    repetition_penalties: torch.Tensor | None  # [B, 1] float32
    seen_mask: torch.Tensor | None  # [B, V] bool: token in prompt or output
    frequency_penalties: torch.Tensor | None  # [B, 1] float32
    presence_penalties: torch.Tensor | None  # [B, 1] float32
    output_counts: torch.Tensor | None  # [B, V] float32: occurrences in the output

    @classmethod
    def from_reqs(cls, reqs: list[Req], vocab_size: int,
                  device: torch.device | str) -> "PenaltyState | None":
        """Build the state, or return None when no request in the batch uses a penalty."""
        params = [r.sampling_params for r in reqs]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)
        if not (use_rep or use_freq or use_pres):
            return None

        def column(name: str) -> torch.Tensor:
            values = [float(getattr(p, name)) for p in params]
            return host_to_device(values, torch.float32, device).unsqueeze(1)

        shape = (len(reqs), vocab_size)
        seen_mask = output_counts = None
        if use_rep:
            seen_mask = _token_counts([r.all_ids for r in reqs], shape, device) > 0
        if use_freq or use_pres:
            output_counts = _token_counts([r.output_ids for r in reqs], shape, device)
        return cls(
            repetition_penalties=column("repetition_penalty") if use_rep else None,
            seen_mask=seen_mask,
            frequency_penalties=column("frequency_penalty") if use_freq else None,
            presence_penalties=column("presence_penalty") if use_pres else None,
            output_counts=output_counts,
        )

    def apply(self, logits: torch.Tensor) -> None:
        """Penalise `logits` ([B, V] float32) in place."""
        if self.repetition_penalties is not None and self.seen_mask is not None:
            rep = self.repetition_penalties
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits.copy_(torch.where(self.seen_mask, penalised, logits))
        if self.output_counts is None:
            return
        if self.frequency_penalties is not None:
            logits.sub_(self.frequency_penalties * self.output_counts)
        if self.presence_penalties is not None:
            logits.sub_(self.presence_penalties * (self.output_counts > 0).float())


def _token_counts(token_lists: list[list[int]], shape: tuple[int, int],
                  device: torch.device | str) -> torch.Tensor:
    """[B, V] float32 counts of each token per row, built with one scatter_add.

    Ids outside [0, V) (e.g. padding ids a tokenizer adds beyond the model's vocabulary)
    are dropped rather than allowed to corrupt a neighbouring row.
    """
    rows, vocab = shape
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    row_ids = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), lengths)
    valid = (tokens >= 0) & (tokens < vocab)
    flat_index = to_device_async((row_ids * vocab + tokens)[valid], device)
    counts = torch.zeros(rows * vocab, dtype=torch.float32, device=device)
    counts.scatter_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
    return counts.view(rows, vocab)
