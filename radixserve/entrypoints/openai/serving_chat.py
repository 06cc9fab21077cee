"""POST /v1/chat/completions: the model's chat template, then TokenizerManager.generate.

Tools and reasoning wrap that: chat_tools decides what the template sees and which
grammar forces a call; chat_output splits the generated text into reasoning, content
and tool calls.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixserve.entrypoints.openai.chat_output import (
    MessageStream,
    OutputParsers,
    chat_finish_reason,
    parse_message,
)
from radixserve.entrypoints.openai.chat_tools import ToolPlan, plan_tools
from radixserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    finish_reason,
    matched_stop,
    usage,
)
from radixserve.entrypoints.openai.serving_completions import (
    collect_outputs,
    rename_param,
    sse_events,
)
from radixserve.managers.multimodal_requests import chat_media
from radixserve.managers.request_validation import InvalidRequestError, check_prompt_bytes
from radixserve.managers.tokenizer_manager import GenerateReqInput, TokenizerManager
from radixserve.parsers import get_reasoning_parser

# TokenizerManager's and the grammar's field names -> the names this endpoint's clients
# sent (a chat request's json_schema comes from response_format, its ebnf from tool_choice).
PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
               "prompt": "messages", "input_ids": "messages", "text": "messages",
               "top_logprobs_num": "top_logprobs", "json_schema": "response_format",
               "ebnf": "tool_choice"}


def apply_chat_template(tm: TokenizerManager, req: ChatCompletionRequest,
                        tools: list[dict[str, Any]] | None = None
                        ) -> tuple[list[int], list[Any]]:
    """The prompt's ids, and the images / videos its content parts carry (in order)."""
    if tm.tokenizer is None or not getattr(tm.tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions or "
                                  "start the server with --chat-template", "messages")
    messages, media = chat_media([m.template_dict() for m in req.messages])
    if media:
        tm.media_preparer().check_takes(media)
    return template_ids(tm, messages, tools), media


def render_template(tokenizer: Any, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> str:
    """The chat template's text for `messages`; a template that rejects them is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template may raise on message orders it rejects
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}",
                                  "messages") from exc


def template_ids(tm: TokenizerManager, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The templated prompt's token ids, within --max-prompt-bytes (every chat-shaped
    endpoint: OpenAI's and Ollama's)."""
    prompt = render_template(tm.tokenizer, messages, tools)
    check_prompt_bytes(prompt, tm.validator.request_limits.max_prompt_bytes, "messages")
    # The template already wrote any BOS/special tokens it wants.
    return list(tm.tokenizer.encode(prompt, add_special_tokens=False))


def sampling_params(req: ChatCompletionRequest, plan: ToolPlan) -> dict[str, Any]:
    params = {**req.sampling_params(req.max_new_tokens), **plan.grammar}
    if plan.parser is not None:
        # Formats mark calls with special tokens (<|python_tag|>, [TOOL_CALLS]).
        params["skip_special_tokens"] = False
    return params


def output_parsers(tm: TokenizerManager, req: ChatCompletionRequest,
                   plan: ToolPlan) -> OutputParsers:
    name = tm.server_args.reasoning_parser
    reasoning = get_reasoning_parser(name) if name and req.separate_reasoning else None
    return OutputParsers(reasoning, plan.parser)


async def create_chat_completion(tm: TokenizerManager, req: ChatCompletionRequest,
                                 request: Request) -> Response:
    plan = plan_tools(req, tm.server_args.tool_call_parser)
    ids, media = await tm.off_loop(apply_chat_template, tm, req, plan.template_tools)
    obj = GenerateReqInput(
        input_ids=ids, media=[media] if media else None,
        sampling_params=sampling_params(req, plan), stream=req.stream,
        return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0,
        return_text_in_logprobs=True, data_parallel_rank=req.data_parallel_rank,
        **req.bootstrap_fields())
    try:
        outputs = await tm.generate(obj, None if req.stream else request)
    except InvalidRequestError as exc:
        raise _renamed(exc) from None
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": tm.served_model_name}
    parsers = output_parsers(tm, req, plan)
    if req.stream:
        return StreamingResponse(sse_events(_chunks(outputs, req, parsers),
                                            {**head, "object": "chat.completion.chunk"}, req,
                                            PARAM_NAMES),
                                 media_type="text/event-stream")
    results = await collect_outputs(outputs, PARAM_NAMES)
    choices = [_choice(out, req, parsers) for out in results]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": usage(results, req.n)})


def _choice(out: dict[str, Any], req: ChatCompletionRequest,
            parsers: OutputParsers) -> dict[str, Any]:
    meta = out["meta_info"]
    message = parse_message(out["text"], parsers)
    return {"index": out["index"], "message": message,
            "logprobs": chat_logprobs(meta, 0) if req.logprobs else None,
            "finish_reason": chat_finish_reason(finish_reason(meta), "tool_calls" in message),
            "matched_stop": matched_stop(meta)}


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


async def _chunks(outputs: AsyncIterator[dict[str, Any]], req: ChatCompletionRequest,
                  parsers: OutputParsers) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(output, choice delta) per streamed output, for sse_events."""
    sent_logprobs: dict[int, int] = {}
    messages: dict[int, MessageStream] = {}
    async with aclosing(outputs) as gen:
        async for out in gen:
            index, meta = out["index"], out["meta_info"]
            if index not in messages:
                messages[index] = MessageStream(parsers)
            message = messages[index]
            delta = message.feed(out["delta"], final=out["finished"])
            if index not in sent_logprobs:
                delta["role"] = "assistant"
            logprobs = None
            if req.logprobs:
                logprobs = chat_logprobs(meta, sent_logprobs.get(index, 0))
            sent_logprobs[index] = len(meta.get("output_token_logprobs", []))
            reason = None
            if out["finished"]:
                reason = chat_finish_reason(finish_reason(meta), message.made_calls)
            yield out, {"index": index, "delta": delta, "logprobs": logprobs,
                        "finish_reason": reason,
                        "matched_stop": matched_stop(meta) if reason else None}
