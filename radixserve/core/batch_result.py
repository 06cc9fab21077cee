"""BatchResult: what one forward gives back to the scheduler, as host values."""

from __future__ import annotations

from dataclasses import dataclass

# A (logprob, token id) pair; a top-k list is a list of them.
TokenLogprob = tuple[float, int]


@dataclass
class BatchResult:
    next_token_ids: list[int]  # one per request (ignored for unfinished chunks)
    # Per request: logprob of the sampled token and its top-k, when asked.
    next_token_logprobs: list[TokenLogprob | None]
    next_top_logprobs: list[list[TokenLogprob] | None]
    # Per request: prompt logprobs computed in this forward, as (logprob, token_id) for
    # each prompt token whose logits this chunk produced, and their top-k lists.
    input_logprobs: list[list[TokenLogprob] | None]
    input_top_logprobs: list[list[list[TokenLogprob]] | None]
    # Speculative decoding: per request, the tokens accepted after next_token_ids[i] in
    # the same step, in order (their KV is committed); None: one token per request.
    extra_token_ids: list[list[int]] | None = None
    # A pooling model's output, one vector per request (embedding or class scores);
    # None for a generating model.
    pooled: list[list[float]] | None = None

    @classmethod
    def tokens_only(cls, ids: list[int]) -> "BatchResult":
        n = len(ids)
        return cls(ids, [None] * n, [None] * n, [None] * n, [None] * n)
