"""What the scheduler sends the detokenizer after a step: each request's news since its
last message (new tokens, new logprobs, and its prompt logprobs once they are complete)."""

from __future__ import annotations

from collections.abc import Iterable

from radixserve.core.req import Req
from radixserve.managers.io_struct import BatchTokenIDOut


def build_token_id_out(reqs: Iterable[Req]) -> BatchTokenIDOut | None:
    """One message for the requests that have news: streaming requests every time they
    produce a token, the others once, when they finish. Advances each request's sent
    offsets, so nothing is sent twice."""
    out = BatchTokenIDOut([], [], [], [], [], [], [], [], [], [], [], [], [])
    for req in reqs:
        if not (req.finished() or req.stream):
            continue
        out.rids.append(req.rid)
        # Entries past num_resolved are placeholders of a batch still in flight.
        out.new_output_ids.append(req.output_ids[req.sent_offset:req.num_resolved])
        req.sent_offset = req.num_resolved
        out.finished_reasons.append(req.finished_reason)
        out.prompt_tokens.append(len(req.origin_input_ids))
        out.completion_tokens.append(req.num_resolved)
        out.cached_tokens.append(req.cached_tokens)
        out.spec_verify_ct.append(req.spec_verify_ct)
        out.embeddings.append(req.embedding)
        sp = req.sampling_params
        out.skip_special_tokens.append(sp.skip_special_tokens)
        out.spaces_between_special_tokens.append(sp.spaces_between_special_tokens)
        out.no_stop_trim.append(sp.no_stop_trim)
        _append_logprobs(req, out)
    return out if out.rids else None


def _append_logprobs(req: Req, out: BatchTokenIDOut) -> None:
    if not req.return_logprob:
        for lst in (out.output_token_logprobs, out.output_top_logprobs,
                    out.input_token_logprobs, out.input_top_logprobs):
            lst.append(None)
        return
    start = req.sent_logprob_offset
    out.output_token_logprobs.append(req.output_token_logprobs[start:])
    out.output_top_logprobs.append(req.output_top_logprobs[start:])
    req.sent_logprob_offset = len(req.output_token_logprobs)
    send_input = (not req.sent_input_logprobs and req.input_token_logprobs is not None
                  and (req.input_logprobs_done or req.finished()))
    out.input_token_logprobs.append(req.input_token_logprobs if send_input else None)
    out.input_top_logprobs.append(req.input_top_logprobs if send_input else None)
    if send_input:
        req.sent_input_logprobs = True
