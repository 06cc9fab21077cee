"""SGLang-native POST /encode and /classify: a pooling model's vector per prompt.

The body is SGLang's EmbeddingReqInput: `text` (a string or a list) or `input_ids` (a
list of ids or a list of such lists), `rid`, and `dimensions` (Matryoshka truncation).
The answer is SGLang's: {"embedding": [...], "meta_info": {"id", "finish_reason",
"prompt_tokens", "cached_tokens"}}, a list of them for a batch. /classify is the same
route, as in SGLang: a classification or reward model's `embedding` holds its scores.
Fields radixserve does not implement (images, LoRA, input_embeds, ...) are 400s when set.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import StrictInt

from radixserve.entrypoints.openai.protocol import RequestModel, parse_request
from radixserve.entrypoints.openai.serving_embedding import (ClassifyRequest,
                                                             EmbeddingRequest,
                                                             create_classification,
                                                             create_embedding)
from radixserve.managers.pooling_output import truncate_embedding
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import TokenizerManager

BodyReader = Any  # async (Request) -> parsed JSON body (http_server._json_body)

_UNSUPPORTED: dict[str, Any] = {
    "image_data": None, "video_data": None, "audio_data": None, "input_embeds": None,
    "lora_path": None, "lora_id": None, "is_cross_encoder_request": False,
    "return_pooled_hidden_states": False,
}


class EncodeRequest(RequestModel):
    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    rid: str | None = None
    dimensions: StrictInt | None = None
    sampling_params: dict[str, Any] | None = None  # SGLang's placeholder; unused
    log_metrics: bool = True  # radixserve's metrics count every request


async def encode(tm: TokenizerManager, body: Any, request: Request) -> Response:
    if isinstance(body, dict):
        for name, default in _UNSUPPORTED.items():
            if body.get(name, default) not in (default, [], {}):
                raise InvalidRequestError(f"{name} is not supported by radixserve yet "
                                          f"(leave it unset)", name)
    req: EncodeRequest = parse_request(EncodeRequest, body)
    dims = tm.validator.check_dimensions(req.dimensions)
    items, single = await tm.encode(req.text, req.input_ids, req.rid, request)
    normalize = tm.pooling is not None and tm.pooling.normalize
    for item in items:
        item["embedding"] = truncate_embedding(item["embedding"], dims, normalize)
    return JSONResponse(items[0] if single else items)


def register(app: FastAPI, tm: TokenizerManager, read_body: BodyReader) -> None:
    """Add /encode, /classify, /v1/embeddings and /v1/classify to `app`."""

    async def encode_route(request: Request) -> Response:
        return await encode(tm, await read_body(request), request)

    async def embeddings_route(request: Request) -> dict[str, Any]:
        req = parse_request(EmbeddingRequest, await read_body(request))
        return await create_embedding(tm, req, request)

    async def classify_route(request: Request) -> dict[str, Any]:
        req = parse_request(ClassifyRequest, await read_body(request))
        return await create_classification(tm, req, request)

    for path in ("/encode", "/classify"):
        app.add_api_route(path, encode_route, methods=["POST", "PUT"])
    app.add_api_route("/v1/embeddings", embeddings_route, methods=["POST"])
    app.add_api_route("/v1/classify", classify_route, methods=["POST"])
