"""Messages between the TokenizerManager, the Scheduler and the DetokenizerManager.

They cross process boundaries pickled over ZMQ, so they are plain dataclasses of
Python lists and scalars; the one exception is a multimodal request's pixel tensors,
sent once with the request (never in per-step messages).
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
    # Images / videos: multimodal/inputs.py MultimodalInputs (input_ids already hold
    # each item's placeholder tokens); None for a text request.
    mm_inputs: Any = None
    # The DP replica the client (sglang-router --dp-aware) chose; None: ours chooses.
    data_parallel_rank: int | None = None
    # Prefill/decode disaggregation (SGLang's fields, set by the router): the prefill
    # server's bootstrap address and the room pairing the prefill and decode halves.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


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
class ExpertDistributionReq:
    """/start_, /stop_ and /dump_expert_distribution_record: action is start, stop or
    dump. `reduce`: the answer sums the EP group's ranks (TP ranks, collectively at a
    step boundary); the DP controller asks its DP-attention ranks with False and sums
    their answers itself."""

    action: str
    reduce: bool = True


@dataclass
class ExpertDistributionReqOutput:
    """The answer; `record` (dump only) is layers/moe/ep/expert_distribution.py's
    record as lists: mode, moe_layers, logical_count [layers][experts], and per mode
    logical_count_per_pass or per_token."""

    success: bool
    message: str = ""
    record: dict[str, Any] | None = None


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
    # Finished requests, as /metrics' counters of the same names (scheduler_stats.py).
    num_requests_total: int = 0
    num_aborted_requests_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0


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
    # Speculative decoding: verify passes per request so far (0 when it is off).
    spec_verify_ct: list[int] = field(default_factory=list)
    # A pooling model's vector per request (embedding or scores), once it finished;
    # empty for a generating model.
    embeddings: list[list[float] | None] = field(default_factory=list)


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
    # Speculative decoding: verify passes per request so far (0 when it is off).
    spec_verify_ct: list[int] = field(default_factory=list)
    # As BatchTokenIDOut's: passed on untouched.
    embeddings: list[list[float] | None] = field(default_factory=list)


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


def spec_meta(out: BatchStrOut, i: int) -> dict[str, Any]:
    """meta_info's speculative-decoding entries for request i, as SGLang names them
    (none when speculation is off): verify passes, and tokens per pass."""
    ct = out.spec_verify_ct[i] if out.spec_verify_ct else 0
    if not ct:
        return {}
    return {"spec_verify_ct": ct, "spec_accept_length": out.completion_tokens[i] / ct}
