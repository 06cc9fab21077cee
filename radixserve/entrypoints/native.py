"""SGLang-native POST /generate.

Responses are {"text", "output_ids", "meta_info"} (a list for batched prompts or
n > 1). Streamed chunks carry the cumulative text and ids so far, as SGLang's do,
plus "index" to tell the prompts/samples of one call apart.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixserve.entrypoints.openai.protocol import (
    SSE_DONE,
    RequestModel,
    error_body,
    parse_request,
    sse_event,
)
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import (
    GenerateReqInput,
    ServerDeadError,
    TokenizerManager,
)


class GenerateRequest(RequestModel):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    rid: str | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


async def generate(tm: TokenizerManager, body: Any, request: Request) -> Response:
    req: GenerateRequest = parse_request(GenerateRequest, body)
    obj = GenerateReqInput(**req.model_dump())
    obj.sampling_params = obj.sampling_params or {}
    outputs = tm.generate(obj, None if req.stream else request)
    batched = isinstance(req.text, list) or (
        isinstance(req.input_ids, list) and bool(req.input_ids)
        and isinstance(req.input_ids[0], list)) or obj.sampling_params.get("n", 1) != 1
    if req.stream:
        return StreamingResponse(_stream(outputs), media_type="text/event-stream")
    results: list[dict[str, Any]] = []
    async with aclosing(outputs) as gen:
        async for out in gen:
            results.append(out)
    results.sort(key=lambda o: o["index"])
    bodies = [_body(out) for out in results]
    return JSONResponse(bodies if batched else bodies[0])


def _body(out: dict[str, Any]) -> dict[str, Any]:
    return {"text": out["text"], "output_ids": out["output_ids"], "meta_info": out["meta_info"]}


async def _stream(outputs: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async with aclosing(outputs) as gen:
            async for out in gen:
                yield sse_event({**_body(out), "index": out["index"]})
    except InvalidRequestError as exc:
        yield sse_event(error_body(exc.message, exc.param, 400))
    except ServerDeadError as exc:
        yield sse_event(error_body(str(exc), None, 503, "server_error"))
    yield SSE_DONE
