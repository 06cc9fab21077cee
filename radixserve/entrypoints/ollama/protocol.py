"""Ollama's request bodies and how their `options` map onto SamplingParams."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from radixserve.constrained.xgrammar_backend import ANY_JSON
from radixserve.entrypoints.openai.protocol import RequestModel
from radixserve.managers.request_validation import InvalidRequestError


class Options(RequestModel):
    """The sampling part of Ollama's `options` (the runner's, num_ctx etc., are ignored)."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def sampling_params(self, fmt: Any) -> dict[str, Any]:
        renamed = {"max_new_tokens": self.num_predict, "temperature": self.temperature,
                   "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                   "seed": self.seed, "stop": self.stop,
                   "repetition_penalty": self.repeat_penalty,
                   "presence_penalty": self.presence_penalty,
                   "frequency_penalty": self.frequency_penalty}
        # Ollama's num_predict -1 means "until the context is full"; a null max_new_tokens
        # means the same here.
        if self.num_predict is not None and self.num_predict < 0:
            renamed["max_new_tokens"] = None
        params = {k: v for k, v in renamed.items()
                  if v is not None or (k == "max_new_tokens" and self.num_predict is not None)}
        params.update(_format_grammar(fmt))
        return params


def _format_grammar(fmt: Any) -> dict[str, str]:
    """`format`: "json" (any JSON) or a JSON schema object."""
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return {"json_schema": ANY_JSON}
    if isinstance(fmt, dict):
        return {"json_schema": json.dumps(fmt)}
    raise InvalidRequestError('format must be "json" or a JSON schema object', "format")


class GenerateRequest(RequestModel):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    images: list[str] | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: Any = None
    think: Any = None


class Message(RequestModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(RequestModel):
    model: str
    messages: list[Message]
    stream: bool = True
    format: str | dict[str, Any] | None = None
    tools: list[Any] | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: Any = None
    think: Any = None


class ShowRequest(RequestModel):
    model: str | None = None
    name: str | None = None  # older clients' name for model
