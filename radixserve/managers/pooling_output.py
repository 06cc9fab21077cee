"""What a pooling model's answer becomes for the client, shared by the server and the
offline Engine: Matryoshka truncation of embeddings, and SGLang's result shape."""

from __future__ import annotations

import math
from typing import Any


def truncate_embedding(embedding: list[float], dimensions: int | None,
                       normalize: bool) -> list[float]:
    """The first `dimensions` values, L2-normalised again when the model normalises
    (a cut unit vector is shorter than 1). Truncating the normalised vector and
    normalising once more equals normalising the truncated raw one: the scale cancels."""
    if dimensions is None or dimensions >= len(embedding):
        return embedding
    cut = embedding[:dimensions]
    if not normalize:
        return cut
    norm = math.sqrt(math.fsum(x * x for x in cut))
    # A zero vector stays zero, as torch.nn.functional.normalize leaves it.
    return [x / norm for x in cut] if norm > 0 else cut


def encode_result(rid: str, embedding: list[float], prompt_tokens: int,
                  finish_reason: Any, cached_tokens: int = 0) -> dict[str, Any]:
    """SGLang's /encode (and /classify) item: {"embedding", "meta_info"}."""
    return {"embedding": embedding,
            "meta_info": {"id": rid, "finish_reason": finish_reason,
                          "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}}
