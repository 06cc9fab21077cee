"""Messages between the TokenizerManager, the Scheduler and the DetokenizerManager.

They cross process boundaries pickled over ZMQ, so they are plain dataclasses of
Python lists and scalars (never tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve.core.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReqInput:
    """One request, tokenized, as the scheduler receives it (n is already expanded)."""

    rid: str
    input_text: str | None
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    # Position from which prompt logprobs are returned; -1 means none.
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetServerInfoReq:
    pass


@dataclass
class ServerInfo:
    """Scheduler state for /get_server_info and leak checks in tests."""

    max_total_num_tokens: int
    available_tokens: int  # free slots in the allocator
    evictable_tokens: int  # cached in the radix tree and not locked
    protected_tokens: int  # cached and locked by running requests
    num_running_reqs: int
    num_waiting_reqs: int
    num_retractions: int
    total_prefill_tokens: int  # tokens actually run through prefill (not cached)
    total_cached_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchTokenIDOut:
    """Per scheduler step: the new token ids of every request that produced output.

    `new_output_ids[i]` holds only the tokens produced since the last message for
    `rids[i]`; the detokenizer keeps the running text per rid.
    """

    rids: list[str]
    new_output_ids: list[list[int]]
    finished_reasons: list[dict[str, Any] | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # Per-request decode settings the detokenizer needs.
    skip_special_tokens: list[bool]
    spaces_between_special_tokens: list[bool]
    no_stop_trim: list[bool]
    # Logprobs: per request, lists of (logprob, token_id) and top-k lists of the same,
    # only the new ones since the last message; None when not requested.
    output_token_logprobs: list[list[tuple[float, int]] | None]
    output_top_logprobs: list[list[list[tuple[float, int]]] | None]
    input_token_logprobs: list[list[tuple[float | None, int]] | None]
    input_top_logprobs: list[list[list[tuple[float, int]] | None] | None]


@dataclass
class BatchStrOut:
    """Detokenized output for the TokenizerManager (text deltas plus meta)."""

    rids: list[str]
    text_deltas: list[str]
    output_ids: list[list[int]]  # new ids, same as BatchTokenIDOut
    finished_reasons: list[dict[str, Any] | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    output_token_logprobs: list[list[tuple[float, int]] | None]
    output_top_logprobs: list[list[list[tuple[float, int]]] | None]
    input_token_logprobs: list[list[tuple[float | None, int]] | None]
    input_top_logprobs: list[list[list[tuple[float, int]] | None] | None]


@dataclass
class FlushCacheReqOutput:
    """The scheduler's answer to FlushCacheReq (False while requests are running)."""

    success: bool


@dataclass
class RegisterStopStrsReq:
    """Tells the detokenizer a request's stop strings before its first output.

    The server's scheduler process forwards it on the same socket as the token
    outputs, so it always arrives first; the in-process Engine calls
    `Detokenizer.register` directly.
    """

    rid: str
    stop_strs: list[str]
