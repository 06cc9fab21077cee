"""POST /tokenize and /detokenize (also under /v1/), in SGLang's shapes.

/tokenize {"prompt": str | [str], "add_special_tokens": true} gives {"tokens", "count",
"max_model_len"}; with "messages" instead of "prompt", the chat template is applied
first, as for a chat completion. /detokenize {"tokens": [int] | [[int]],
"skip_special_tokens": true} gives {"text"}. A list in gives a list out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from radixserve.entrypoints.openai.protocol import ChatMessage, RequestModel, parse_request
from radixserve.entrypoints.openai.serving_chat import render_template
from radixserve.managers.multimodal_requests import chat_media
from radixserve.managers.request_validation import InvalidRequestError, check_prompt_bytes
from radixserve.managers.tokenizer_manager import TokenizerManager

BodyReader = Any  # async (Request) -> parsed JSON body (http_server._json_body)


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = True


def tokenize(tm: TokenizerManager, req: TokenizeRequest) -> dict[str, Any]:
    """Run in the tokenizer thread (TokenizerManager.off_loop), as generation's is."""
    tokenizer = _tokenizer(tm)
    limit = tm.validator.request_limits.max_prompt_bytes
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("exactly one of prompt and messages must be given", "prompt")
    if req.messages is not None:
        if not req.messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        text = _apply_template(tokenizer, req)
        check_prompt_bytes(text, limit, "messages")
        tokens: Any = list(tokenizer.encode(text, add_special_tokens=False))
        count: Any = len(tokens)
    elif isinstance(req.prompt, str):
        check_prompt_bytes(req.prompt, limit, "prompt")
        tokens = list(tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        count = len(tokens)
    else:
        if not req.prompt:
            raise InvalidRequestError("prompt must not be an empty list", "prompt")
        for i, p in enumerate(req.prompt):
            check_prompt_bytes(p, limit, f"prompt.{i}")
        tokens = [list(tokenizer.encode(p, add_special_tokens=req.add_special_tokens))
                  for p in req.prompt]
        count = [len(t) for t in tokens]
    return {"tokens": tokens, "count": count, "max_model_len": tm.limits.context_len}


def detokenize(tm: TokenizerManager, req: DetokenizeRequest) -> dict[str, Any]:
    tokenizer = _tokenizer(tm)
    single = not (req.tokens and isinstance(req.tokens[0], list))
    batch: list[list[int]] = [req.tokens] if single else req.tokens  # type: ignore[list-item]
    for i, ids in enumerate(batch):
        bad = [t for t in ids if not 0 <= t < tm.limits.vocab_size]
        if bad:
            where = "tokens" if single else f"tokens.{i}"
            raise InvalidRequestError(f"{where} holds ids outside [0, {tm.limits.vocab_size})"
                                      f": {bad[:5]}", where)
    texts = [tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens)
             for ids in batch]
    return {"text": texts[0] if single else texts}


def register(app: FastAPI, tm: TokenizerManager, read_body: BodyReader) -> None:
    """Add the routes to `app`; `read_body` parses a request body as the server does."""

    async def tokenize_route(request: Request) -> dict[str, Any]:
        req = parse_request(TokenizeRequest, await read_body(request))
        return await tm.off_loop(tokenize, tm, req)

    async def detokenize_route(request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, await read_body(request))
        return await tm.off_loop(detokenize, tm, req)

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenize", tokenize_route, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize_route, methods=["POST"])


def _tokenizer(tm: TokenizerManager) -> Any:
    if tm.tokenizer is None:
        raise InvalidRequestError("the server runs without a tokenizer "
                                  "(--skip-tokenizer-init)", None)
    return tm.tokenizer


def _apply_template(tokenizer: Any, req: TokenizeRequest) -> str:
    # Image/video parts render as the template's placeholders (one pad token each: the
    # count an item expands to is known only once it is processed).
    messages, _media = chat_media([m.template_dict() for m in req.messages or []])
    return render_template(tokenizer, messages,
                           add_generation_prompt=req.add_generation_prompt)
