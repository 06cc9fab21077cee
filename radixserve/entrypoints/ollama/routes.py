"""The Ollama routes over the TokenizerManager.

Streaming answers are NDJSON (one JSON object a line, the last with "done": true and
the counts), as Ollama's are. One model is served, so every `model` name is accepted
and the answer reports the served name. Errors are the server's usual 400 bodies,
which the ollama client raises as ResponseError.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from radixserve.entrypoints.ollama.embed import EmbedRequest, embed
from radixserve.entrypoints.ollama.protocol import ChatRequest, GenerateRequest, ShowRequest
from radixserve.entrypoints.openai.protocol import parse_request
from radixserve.entrypoints.openai.serving_chat import template_ids
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import (GenerateReqInput, ServerDeadError,
                                                   TokenizerManager)

# The Ollama release whose API this follows; clients check it for features.
OLLAMA_API_VERSION = "0.6.0"

Piece = Callable[[str, bool], dict[str, Any]]  # (text delta, done) -> the body's own part


def register(app: FastAPI, tm: TokenizerManager, read_body: Callable[[Request], Any]) -> None:
    """Add the routes; `read_body` parses a request body as the server does."""

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        req = parse_request(GenerateRequest, await read_body(request))
        if req.images:
            raise InvalidRequestError("images are not supported by this model", "images")
        text, ids = (req.prompt, None) if req.raw else await tm.off_loop(
            _generate_prompt, tm, req)
        obj = GenerateReqInput(text=text, input_ids=ids, stream=req.stream,
                               sampling_params=req.options.sampling_params(req.format))
        return await _answer(tm, obj, request, lambda text, done: {"response": text})

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        req = parse_request(ChatRequest, await read_body(request))
        if not req.messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        if any(m.images for m in req.messages):
            raise InvalidRequestError("images are not supported by this model", "messages")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt = await tm.off_loop(_apply_template, tm, messages)
        obj = GenerateReqInput(input_ids=prompt, stream=req.stream,
                               sampling_params=req.options.sampling_params(req.format))
        return await _answer(tm, obj, request, lambda text, done: {
            "message": {"role": "assistant", "content": text}})

    @app.post("/api/embed")
    async def embed_route(request: Request) -> dict[str, Any]:
        return await embed(tm, parse_request(EmbedRequest, await read_body(request)), request)

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_model_entry(tm)]}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return {"models": [{**_model_entry(tm), "expires_at": None, "size_vram": 0}]}

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        req = parse_request(ShowRequest, await read_body(request))
        if (req.model or req.name) is None:
            raise InvalidRequestError("model is required", "model")
        template = getattr(tm.tokenizer, "chat_template", None) or ""
        return {"modified_at": _now(), "template": template, "modelfile": "",
                "license": "", "parameters": "", "details": _details(tm),
                "model_info": {"general.architecture": _family(tm),
                               "context_length": tm.limits.context_len},
                "capabilities": ["completion"]}

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}


async def _answer(tm: TokenizerManager, obj: GenerateReqInput, request: Request,
                  piece: Piece) -> Response:
    outputs = await tm.generate(obj, None if obj.stream else request)
    started = time.monotonic_ns()
    if obj.stream:
        return StreamingResponse(_ndjson(tm, outputs, piece, started),
                                 media_type="application/x-ndjson")
    async with aclosing(outputs) as gen:
        results = [out async for out in gen]
    if not results:  # the client left; the request was aborted
        return Response(status_code=204)
    final = results[-1]
    return JSONResponse({**_head(tm), **piece(final["text"], True),
                         **_tail(final, started)})


async def _ndjson(tm: TokenizerManager, outputs: AsyncIterator[dict[str, Any]], piece: Piece,
                  started: int) -> AsyncIterator[str]:
    try:
        async with aclosing(outputs) as gen:
            async for out in gen:
                if out["finished"]:
                    if out["delta"]:
                        yield _line({**_head(tm), **piece(out["delta"], False), "done": False})
                    yield _line({**_head(tm), **piece("", True), **_tail(out, started)})
                elif out["delta"]:
                    yield _line({**_head(tm), **piece(out["delta"], False), "done": False})
    except InvalidRequestError as exc:
        yield _line({"error": exc.message})
    except ServerDeadError as exc:
        yield _line({"error": str(exc)})


def _head(tm: TokenizerManager) -> dict[str, Any]:
    return {"model": tm.served_model_name, "created_at": _now()}


def _tail(out: dict[str, Any], started: int) -> dict[str, Any]:
    meta = out["meta_info"]
    reason = (meta.get("finish_reason") or {}).get("type")
    elapsed = time.monotonic_ns() - started
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": elapsed, "load_duration": 0,
            "prompt_eval_count": meta["prompt_tokens"], "prompt_eval_duration": 0,
            "eval_count": meta["completion_tokens"], "eval_duration": elapsed}


def _line(body: dict[str, Any]) -> str:
    return json.dumps(body) + "\n"


def _generate_prompt(tm: TokenizerManager, req: GenerateRequest
                     ) -> tuple[str | None, list[int] | None]:
    """Ollama wraps a prompt in the model's template, with `system` if given: the
    templated token ids, or the plain text when the model has no template."""
    if req.template is not None:
        raise InvalidRequestError("template is not supported (Go templates); send "
                                  "raw: true with a formatted prompt", "template")
    if getattr(tm.tokenizer, "chat_template", None) is None:
        return (req.system + "\n" if req.system else "") + req.prompt, None
    messages = ([{"role": "system", "content": req.system}] if req.system else [])
    return None, _apply_template(tm, [*messages, {"role": "user", "content": req.prompt}])


def _apply_template(tm: TokenizerManager, messages: list[dict[str, Any]]) -> list[int]:
    if tm.tokenizer is None:
        raise InvalidRequestError("the server runs without a tokenizer", None)
    return template_ids(tm, messages)


def _model_entry(tm: TokenizerManager) -> dict[str, Any]:
    return {"name": tm.served_model_name, "model": tm.served_model_name,
            "modified_at": _now(), "size": 0, "digest": "", "details": _details(tm)}


def _details(tm: TokenizerManager) -> dict[str, Any]:
    return {"parent_model": "", "format": "radixserve", "family": _family(tm),
            "families": [_family(tm)], "parameter_size": "", "quantization_level": ""}


def _family(tm: TokenizerManager) -> str:
    archs = tm.model_info.get("architectures") or ["unknown"]
    return str(archs[0])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
