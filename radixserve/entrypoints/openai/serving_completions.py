"""POST /v1/completions: OpenAI text completions on top of TokenizerManager.generate."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixserve.entrypoints.openai.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    finish_reason,
    matched_stop,
    sse_event,
    usage,
)
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import (
    GenerateReqInput,
    RequestFailedError,
    ServerDeadError,
    TokenizerManager,
)

# TokenizerManager's field names -> the names this endpoint's clients sent.
PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "text": "prompt",
               "input_ids": "prompt", "top_logprobs_num": "logprobs",
               "logprob_start_len": "logprobs", "json_schema": "response_format"}


def rename_param(exc: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    return InvalidRequestError(exc.message, names.get(exc.param or "", exc.param))


async def collect_outputs(outputs: AsyncIterator[dict[str, Any]],
                          names: dict[str, str]) -> list[dict[str, Any]]:
    """Every output of a non-streamed request, in choice order. A bad request
    found while it runs is re-raised under the client's field names (`names`)."""
    results: list[dict[str, Any]] = []
    try:
        async with aclosing(outputs) as gen:
            async for out in gen:
                results.append(out)
    except InvalidRequestError as exc:
        raise rename_param(exc, names) from None
    results.sort(key=lambda o: o["index"])
    return results


async def sse_events(chunks: AsyncIterator[tuple[dict[str, Any], dict[str, Any]]],
                     head: dict[str, Any], req: CompletionRequest | ChatCompletionRequest,
                     names: dict[str, str]) -> AsyncIterator[str]:
    """A streamed request's events, from its (output, choice delta) pairs: a chunk per
    choice, the usage chunk if asked for, then [DONE]. The response has begun by the time
    a bad request (renamed by `names`) or a dead server shows, so they end it as an
    error event rather than an HTTP status."""
    finals: list[dict[str, Any]] = []
    try:
        # Closing this stream early (a client hang-up) closes `chunks` and so the outputs.
        async with aclosing(chunks) as gen:
            async for out, choice in gen:
                if out["finished"]:
                    finals.append(out)
                yield sse_event({**head, "choices": [choice]})
        if req.include_usage:
            yield sse_event({**head, "choices": [], "usage": usage(finals, req.n)})
    except InvalidRequestError as exc:
        exc = rename_param(exc, names)
        yield sse_event(error_body(exc.message, exc.param, 400))
    except ServerDeadError as exc:
        yield sse_event(error_body(str(exc), None, 503, "server_error"))
    except RequestFailedError as exc:
        yield sse_event(error_body(exc.message, None, exc.status_code, "server_error"))
    yield SSE_DONE


async def create_completion(tm: TokenizerManager, req: CompletionRequest,
                            request: Request) -> Response:
    texts, ids = _split_prompt(req.prompt)
    want_logprobs = req.logprobs is not None
    obj = GenerateReqInput(
        text=texts, input_ids=ids, sampling_params=req.sampling_params(req.max_tokens),
        stream=req.stream, return_logprob=want_logprobs, top_logprobs_num=req.logprobs or 0,
        logprob_start_len=0 if req.echo and want_logprobs else -1,
        return_text_in_logprobs=True, data_parallel_rank=req.data_parallel_rank,
        **req.bootstrap_fields())
    try:
        outputs = await tm.generate(obj, None if req.stream else request)
    except InvalidRequestError as exc:
        raise rename_param(exc, PARAM_NAMES) from None
    prompts = texts if texts is not None else [tm.tokenizer.decode(p) if tm.tokenizer else ""
                                               for p in ids]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": tm.served_model_name}
    if req.stream:
        return StreamingResponse(sse_events(_chunks(outputs, req, prompts), head, req,
                                            PARAM_NAMES),
                                 media_type="text/event-stream")
    results = await collect_outputs(outputs, PARAM_NAMES)
    choices = [_choice(out, req, prompts[out["index"] // req.n]) for out in results]
    return JSONResponse({**head, "choices": choices, "usage": usage(results, req.n)})


def _split_prompt(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(prompt, str):
        return [prompt], None
    if prompt and isinstance(prompt[0], str):
        return list(prompt), None
    if prompt and isinstance(prompt[0], list):
        return None, [list(p) for p in prompt]
    return None, [list(prompt)]


def _choice(out: dict[str, Any], req: CompletionRequest, prompt: str) -> dict[str, Any]:
    meta = out["meta_info"]
    text = prompt + out["text"] if req.echo else out["text"]
    logprobs = None
    if req.logprobs is not None:
        entries, tops = _logprob_entries(meta, req.echo, 0)
        logprobs = completion_logprobs(entries, tops, 0)
    return {"index": out["index"], "text": text, "logprobs": logprobs,
            "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta)}


def _logprob_entries(meta: dict[str, Any], with_input: bool,
                     start: int) -> tuple[list[list[Any]], list[Any]]:
    entries = list(meta.get("output_token_logprobs", []))[start:]
    tops = list(meta.get("output_top_logprobs", []))[start:]
    if with_input:
        entries = list(meta.get("input_token_logprobs", [])) + entries
        tops = list(meta.get("input_top_logprobs", [])) + tops
    return entries, tops


def completion_logprobs(entries: list[list[Any]], tops: list[Any],
                        text_offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object: tokens, their logprobs, top-k, offsets."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for i, (logprob, _token_id, text) in enumerate(entries):
        tokens.append(text)
        token_logprobs.append(logprob)
        top = tops[i] if i < len(tops) else None
        top_logprobs.append({t: lp for lp, _tid, t in top} if top else None)
        offsets.append(text_offset)
        text_offset += len(text or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


async def _chunks(outputs: AsyncIterator[dict[str, Any]], req: CompletionRequest,
                  prompts: list[str]) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(output, choice delta) per streamed output, for sse_events."""
    sent_logprobs: dict[int, int] = {}
    offsets: dict[int, int] = {}
    async with aclosing(outputs) as gen:
        async for out in gen:
            index, meta = out["index"], out["meta_info"]
            first = index not in sent_logprobs
            text = prompts[index // req.n] + out["delta"] if req.echo and first else out["delta"]
            logprobs = None
            if req.logprobs is not None:
                entries, tops = _logprob_entries(meta, req.echo and first,
                                                 sent_logprobs.get(index, 0))
                logprobs = completion_logprobs(entries, tops, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(text)
                sent_logprobs[index] = len(meta.get("output_token_logprobs", []))
            else:
                sent_logprobs[index] = 0
            reason = finish_reason(meta) if out["finished"] else None
            yield out, {"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": reason,
                        "matched_stop": matched_stop(meta) if reason else None}
