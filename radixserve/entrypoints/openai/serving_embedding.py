"""POST /v1/embeddings and /v1/classify: a pooling model's answers in OpenAI's shapes.

/v1/embeddings takes OpenAI's `input` (a string, a list of strings, a list of token ids
or a list of such lists), `dimensions` (Matryoshka truncation, normalised again) and
`encoding_format` ("float", or "base64": the little-endian float32 bytes, which the
official client asks for by default and decodes itself). /v1/classify follows SGLang's
route: per input the softmax of the class scores, the arg-max's label and the number of
classes. Errors in the prompts name `input`, the field the client sent.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from pydantic import StrictInt

from radixserve.entrypoints.openai.protocol import RequestModel
from radixserve.managers.pooling_output import truncate_embedding
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import TokenizerManager

# The internal names of a prompt (request_validation) -> what this API calls it.
_PROMPT_PARAMS = ("text", "input_ids", "prompt")

Input = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(RequestModel):
    input: Input
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None
    rid: str | None = None


class ClassifyRequest(RequestModel):
    input: Input
    model: str | None = None
    user: str | None = None
    rid: str | None = None


def prompt_fields(value: Any) -> dict[str, Any]:
    """OpenAI's `input` as the text / input_ids of request_validation.parse_prompts."""
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and isinstance(value[0], str)):
        return {"text": value}
    if isinstance(value, list) and value:
        return {"input_ids": value}
    raise InvalidRequestError("input must not be empty", "input")


async def encode_input(tm: TokenizerManager, value: Any, rid: str | None, request: Request
                       ) -> list[dict[str, Any]]:
    try:
        items, _single = await tm.encode(rid=rid, request=request, **prompt_fields(value))
    except InvalidRequestError as exc:
        if exc.param in _PROMPT_PARAMS:
            raise InvalidRequestError(exc.message, "input") from None
        raise
    return items


async def create_embedding(tm: TokenizerManager, req: EmbeddingRequest, request: Request
                           ) -> dict[str, Any]:
    if tm.pooling is not None and tm.pooling.task != "embed":
        raise InvalidRequestError("this model classifies: use /v1/classify or /classify",
                                  "model")
    dims = tm.validator.check_dimensions(req.dimensions)
    items = await encode_input(tm, req.input, req.rid, request)
    normalize = tm.pooling is not None and tm.pooling.normalize
    data = []
    for i, item in enumerate(items):
        vector = truncate_embedding(item["embedding"], dims, normalize)
        data.append({"object": "embedding", "index": i,
                     "embedding": _base64(vector) if req.encoding_format == "base64"
                     else vector})
    prompt_tokens = sum(item["meta_info"]["prompt_tokens"] for item in items)
    return {"object": "list", "data": data, "model": tm.served_model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


async def create_classification(tm: TokenizerManager, req: ClassifyRequest,
                                request: Request) -> dict[str, Any]:
    if tm.pooling is None or tm.pooling.task != "classify":
        raise InvalidRequestError("/v1/classify needs a classification or reward model",
                                  "model")
    items = await encode_input(tm, req.input, req.rid, request)
    labels = tm.pooling.labels
    data = []
    for i, item in enumerate(items):
        scores = item["embedding"]
        best = max(range(len(scores)), key=scores.__getitem__)
        data.append({"index": i, "label": labels[best] if best < len(labels) else
                     f"LABEL_{best}", "probs": _softmax(scores), "num_classes": len(scores)})
    prompt_tokens = sum(item["meta_info"]["prompt_tokens"] for item in items)
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()), "model": tm.served_model_name, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                      "total_tokens": prompt_tokens, "prompt_tokens_details": None}}


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = math.fsum(exps)
    return [e / total for e in exps]
