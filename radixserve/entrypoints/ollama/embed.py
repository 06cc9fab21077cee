"""Ollama's POST /api/embed on a pooling model (docs/clients.md, "Embeddings and scores").

`input` is a string or a list of strings; `truncate` (Ollama's default: true) cuts each
input to the model's context instead of refusing it; `dimensions` keeps the first
values, normalised again. The answer is Ollama's: {"model", "embeddings",
"total_duration", "load_duration", "prompt_eval_count"}.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from pydantic import StrictInt

from radixserve.entrypoints.openai.protocol import RequestModel
from radixserve.managers.pooling_output import truncate_embedding
from radixserve.managers.request_validation import (InvalidRequestError, check_prompt_bytes,
                                                    parse_prompts)
from radixserve.managers.tokenizer_manager import TokenizerManager


class EmbedRequest(RequestModel):
    model: str | None = None
    input: str | list[str]
    truncate: bool = True
    dimensions: StrictInt | None = None
    keep_alive: Any = None  # one model, always loaded


async def embed(tm: TokenizerManager, req: EmbedRequest, request: Request) -> dict[str, Any]:
    started = time.perf_counter_ns()
    if tm.pooling is not None and tm.pooling.task != "embed":
        raise InvalidRequestError("this model classifies: use /v1/classify or /classify",
                                  "model")
    dims = tm.validator.check_dimensions(req.dimensions)
    try:
        prompts, _single = parse_prompts(req.input, None)
        ids = await tm.off_loop(_tokenize, tm, prompts, req.truncate)
        items, _ = await tm.encode(input_ids=ids, request=request)
    except InvalidRequestError as exc:
        if exc.param in ("text", "input_ids", "prompt"):
            raise InvalidRequestError(exc.message, "input") from None
        raise
    normalize = tm.pooling is not None and tm.pooling.normalize
    return {"model": tm.served_model_name,
            "embeddings": [truncate_embedding(i["embedding"], dims, normalize) for i in items],
            "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
            "prompt_eval_count": sum(i["meta_info"]["prompt_tokens"] for i in items)}


def _tokenize(tm: TokenizerManager, prompts: list[str], truncate: bool) -> list[list[int]]:
    """In the tokenizer thread; with `truncate`, each cut to the context length."""
    if tm.tokenizer is None:
        raise InvalidRequestError("the server runs without a tokenizer "
                                  "(--skip-tokenizer-init)", "input")
    out = []
    for text in prompts:
        check_prompt_bytes(text, tm.validator.request_limits.max_prompt_bytes, "input")
        ids = list(tm.tokenizer.encode(text))
        out.append(ids[:tm.limits.context_len] if truncate else ids)
    return out
