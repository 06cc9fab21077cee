"""SGLang-native POST /generate.

Responses are {"text", "output_ids", "meta_info"} (a list for batched prompts or
n > 1). Streamed chunks carry the cumulative text and ids so far, as SGLang's do,
plus "index" to tell the prompts/samples of one call apart.

The request takes SGLang's GenerateReqInput fields, images and videos included
(image_data / video_data, docs/multimodal.md). Those radixserve does not
implement (audio, LoRA, hidden states, disaggregation, ...) are accepted at their
defaults only, so SGLang clients that leave them unset run unchanged and a request
that sets one is a 400 naming it, not an answer that silently ignored it.
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
    RequestFailedError,
    ServerDeadError,
    TokenizerManager,
)


# Field -> its default; a request must leave these at the default.
_UNSUPPORTED: dict[str, Any] = {
    "input_embeds": None, "audio_data": None,
    "lora_path": None, "lora_id": None, "custom_logit_processor": None,
    "token_ids_logprob": None, "session_params": None,
    "return_hidden_states": False, "return_routed_experts": False,
}


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
    log_metrics: bool = True  # radixserve's metrics count every request
    # Vision-language models (docs/multimodal.md): a payload or a list per prompt.
    image_data: Any = None
    video_data: Any = None
    # The DP replica to run on: sglang-router --dp-aware sets data_parallel_rank; newer
    # SGLang clients call it routed_dp_rank.
    data_parallel_rank: Any = None
    routed_dp_rank: Any = None
    # Prefill/decode disaggregation: the router sets these on both halves.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


def check_unsupported(body: Any) -> None:
    if not isinstance(body, dict):
        return  # parse_request names the problem
    for name, default in _UNSUPPORTED.items():
        if body.get(name, default) not in (default, [], {}):
            raise InvalidRequestError(f"{name} is not supported by radixserve yet "
                                      f"(leave it unset)", name)


async def generate(tm: TokenizerManager, body: Any, request: Request) -> Response:
    check_unsupported(body)
    req: GenerateRequest = parse_request(GenerateRequest, body)
    obj = GenerateReqInput(**req.model_dump(exclude={"log_metrics", "routed_dp_rank"}))
    if obj.data_parallel_rank is None:
        obj.data_parallel_rank = req.routed_dp_rank
    obj.sampling_params = obj.sampling_params or {}
    outputs = await tm.generate(obj, None if req.stream else request)
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
    except RequestFailedError as exc:
        yield sse_event(error_body(exc.message, None, exc.status_code, "server_error"))
    yield SSE_DONE
