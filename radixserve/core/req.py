"""Req: one request's state, from admission to finish."""

from __future__ import annotations

import time
from typing import Any

import torch

from radixserve.core.sampling_params import SamplingParams


class Req:
    """One request from admission to finish.

    KV bookkeeping: `prefix_indices` are the KV slots of the tokens already in the KV
    pool for this request (matched from the radix cache, or computed by earlier chunks);
    `fill_ids` are the tokens that should be in the KV pool after the next forward; the
    forward computes `fill_ids[len(prefix_indices):]`.
    """

    def __init__(self, rid: str, origin_input_ids: list[int], sampling_params: SamplingParams,
                 origin_input_text: str | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 stream: bool = False, eos_token_ids: set[int] | None = None,
                 mm_inputs: Any = None) -> None:
        self.rid = rid
        self.origin_input_text = origin_input_text
        self.origin_input_ids = list(origin_input_ids)
        self.sampling_params = sampling_params
        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.top_logprobs_num = top_logprobs_num
        self.stream = stream
        self.eos_token_ids = eos_token_ids or set()
        # When the scheduler received it (perf_counter): queue time is measured from here.
        self.time_received = time.perf_counter()

        # Output tokens; while a batch is in flight (overlap scheduling) its entries are
        # placeholders past the first `num_resolved`, which hold real token ids.
        self.output_ids: list[int] = []
        self.num_resolved = 0
        self.fill_ids: list[int] = []
        self.prefix_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.extend_input_len = 0
        self.last_node: Any = None  # radix-tree node locked by this request
        self.req_pool_idx: int | None = None
        # Positions [0, kv_committed_len) of this request have KV in the pool, with
        # their slots in req_to_token[req_pool_idx]. After each forward it equals
        # len(fill_ids); while decoding that is seqlen - 1 (the newest token has none).
        self.kv_committed_len = 0
        # KV slot of position kv_committed_len - 1 (after a batch is prepared: of the
        # newest allocated position), so that paged allocation can fill the last page.
        self.last_loc = -1
        # KV slots allocated for this request's tokens in the batch being prepared.
        self.new_kv_slots: torch.Tensor | None = None
        # Number of prompt tokens whose KV was reused from the cache (first match only).
        self.cached_tokens = 0
        self._cached_tokens_set = False
        # True while the prompt is being prefilled over several chunks.
        self.is_chunked = False
        self.finished_reason: dict[str, Any] | None = None
        self.to_abort = False
        self.num_retractions = 0
        # Speculative decoding: verify passes this request took part in, and the draft
        # tokens they accepted.
        self.spec_verify_ct = 0
        self.spec_accepted_drafts = 0
        # Structured output (constrained/): a ReqGrammar when the request has a
        # json_schema, regex or ebnf, set by the GrammarManager; None otherwise.
        self.grammar: Any = None
        # Images and videos (multimodal/inputs.py MultimodalInputs), None for text. Their
        # placeholder tokens are keyed by the items' hashes in the prefix cache
        # (`key_ids`), and M-RoPE positions past the prompt are offset by rope_delta.
        self.mm_inputs = mm_inputs
        self.rope_delta = 0
        if mm_inputs is not None:
            mm_inputs.bind_prompt(self.origin_input_ids)
            self.rope_delta = mm_inputs.rope_delta

        # A pooling model's answer: the embedding, or the class / reward scores.
        self.embedding: list[float] | None = None

        # Logprob state (only filled when return_logprob).
        self.output_token_logprobs: list[tuple[float, int]] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        self.input_token_logprobs: list[tuple[float | None, int]] | None = None
        self.input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
        # How much output has been sent to the detokenizer already.
        self.sent_offset = 0
        self.sent_logprob_offset = 0
        self.sent_input_logprobs = False
        # Set once every prompt logprob has been computed (a retracted request that is
        # prefilled again must not compute them twice).
        self.input_logprobs_done = False

        # Prefill/decode disaggregation: where the prefill server's bootstrap server
        # listens and the room that pairs this request's two halves (None elsewhere).
        self.bootstrap_host: str | None = None
        self.bootstrap_port: int | None = None
        self.bootstrap_room: int | None = None
        # While set, finishing keeps the request's KV: a prefill server still has to
        # send it to the decode server.
        self.kv_pinned = False

    # --- state -------------------------------------------------------------------

    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling reads this request's exact token history on the host (penalty
        counts), so it cannot run one step ahead of its results. (A grammar also needs
        the history, but only at sampling time: the scheduler launches the forward
        first and fills the mask once the previous token is accepted.)"""
        sp = self.sampling_params
        return (sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0
                or sp.repetition_penalty != 1.0)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def key_ids(self, ids: list[int]) -> list[int]:
        """The prefix-cache key of `ids`, a prefix of this request's tokens: the ids
        themselves, but for image/video placeholders, which stand for their item."""
        return ids if self.mm_inputs is None else self.mm_inputs.key_ids(ids)

    def init_next_round_input(self, tree_cache: Any | None = None) -> None:
        """Set fill_ids to every token and, if given a cache, re-match the prefix."""
        self.fill_ids = self.all_ids
        if tree_cache is not None:
            # The last token must always be computed so that it yields logits.
            match = tree_cache.match_prefix(self.key_ids(self.fill_ids[:-1]))
            self.prefix_indices = match.device_indices
            self.last_node = match.last_node
            if self.return_logprob and self.logprob_start_len >= 0:
                # Prompt logprobs need the logits of those positions: do not reuse them.
                keep = min(len(self.prefix_indices), max(self.logprob_start_len - 1, 0))
                keep -= keep % tree_cache.page_size
                self.prefix_indices = self.prefix_indices[:keep]
        self.extend_input_len = len(self.fill_ids) - len(self.prefix_indices)

    def reset_for_retract(self) -> None:
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None
        self.req_pool_idx = None
        self.kv_committed_len = 0
        self.last_loc = -1
        self.fill_ids = []
        self.extend_input_len = 0
        self.is_chunked = False
        self.num_retractions += 1

    def __repr__(self) -> str:
        return (f"Req(rid={self.rid}, input={len(self.origin_input_ids)}, "
                f"output={len(self.output_ids)}, prefix={len(self.prefix_indices)})")
