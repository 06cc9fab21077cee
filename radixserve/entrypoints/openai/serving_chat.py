"""POST /v1/chat/completions: the model's chat template, then TokenizerManager.generate."""

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
    error_body,
    finish_reason,
    matched_stop,
    sse_event,
    usage,
)
from radixserve.entrypoints.openai.serving_completions import rename_param
from radixserve.managers.tokenizer_manager import (
    GenerateReqInput,
    InvalidRequestError,
    ServerDeadError,
    TokenizerManager,
)

PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
               "prompt": "messages", "input_ids": "messages", "text": "messages",
               "top_logprobs_num": "top_logprobs"}


def apply_chat_template(tm: TokenizerManager, req: ChatCompletionRequest) -> list[int]:
    if tm.tokenizer is None or not getattr(tm.tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions or "
                                  "start the server with --chat-template", "messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in req.messages]
    try:
        prompt = tm.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    except Exception as exc:  # a template may raise on message orders it rejects
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}",
                                  "messages") from exc
    # The template already wrote any BOS/special tokens it wants.
    return list(tm.tokenizer.encode(prompt, add_special_tokens=False))


async def create_chat_completion(tm: TokenizerManager, req: ChatCompletionRequest,
                                 request: Request) -> Response:
    obj = GenerateReqInput(
        input_ids=apply_chat_template(tm, req),
        sampling_params=req.sampling_params(req.max_new_tokens), stream=req.stream,
        return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0,
        return_text_in_logprobs=True)
    try:
        outputs = tm.generate(obj, None if req.stream else request)
    except InvalidRequestError as exc:
        raise _renamed(exc) from None
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": tm.served_model_name}
    if req.stream:
        return StreamingResponse(_stream(outputs, req, head), media_type="text/event-stream")
    results: list[dict[str, Any]] = []
    try:
        async with aclosing(outputs) as gen:
            async for out in gen:
                results.append(out)
    except InvalidRequestError as exc:
        raise _renamed(exc) from None
    results.sort(key=lambda o: o["index"])
    choices = [{
        "index": out["index"],
        "message": {"role": "assistant", "content": out["text"]},
        "logprobs": chat_logprobs(out["meta_info"], 0) if req.logprobs else None,
        "finish_reason": finish_reason(out["meta_info"]),
        "matched_stop": matched_stop(out["meta_info"]),
    } for out in results]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": usage(results, req.n)})


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    return rename_param(exc, PARAM_NAMES)


def chat_logprobs(meta: dict[str, Any], start: int) -> dict[str, Any]:
    """The chat logprobs object for output tokens from `start` on."""
    entries = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:]
    content = []
    for i, (logprob, _token_id, text) in enumerate(entries):
        top = tops[i] if i < len(tops) and tops[i] else []
        content.append({**_token(text, logprob),
                        "top_logprobs": [_token(t, lp) for lp, _tid, t in top]})
    return {"content": content}


def _token(text: str | None, logprob: float) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def _stream(outputs: AsyncIterator[dict[str, Any]], req: ChatCompletionRequest,
                  head: dict[str, Any]) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    sent_logprobs: dict[int, int] = {}
    finals: list[dict[str, Any]] = []
    try:
        async with aclosing(outputs) as gen:
            async for out in gen:
                index, meta = out["index"], out["meta_info"]
                delta: dict[str, Any] = {"content": out["delta"]}
                if index not in sent_logprobs:
                    delta["role"] = "assistant"
                logprobs = None
                if req.logprobs:
                    logprobs = chat_logprobs(meta, sent_logprobs.get(index, 0))
                sent_logprobs[index] = len(meta.get("output_token_logprobs", []))
                reason = None
                if out["finished"]:
                    finals.append(out)
                    reason = finish_reason(meta)
                choice = {"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": reason,
                          "matched_stop": matched_stop(meta) if reason else None}
                yield sse_event({**head, "choices": [choice]})
        if req.include_usage:
            yield sse_event({**head, "choices": [], "usage": usage(finals, req.n)})
    except InvalidRequestError as exc:
        exc = _renamed(exc)
        yield sse_event(error_body(exc.message, exc.param, 400))
    except ServerDeadError as exc:
        yield sse_event(error_body(str(exc), None, 503, "server_error"))
    yield SSE_DONE
