"""OpenAI request models, their mapping onto SamplingParams, and the error body.

Requests are validated with pydantic; a failure becomes a 400 whose `param`
names the offending field (for example `messages.1.role`). Unknown fields are
ignored, as clients send options radixserve does not implement (user, metadata).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radixserve.constrained.xgrammar_backend import ANY_JSON, GrammarError, json_schema_ebnf
from radixserve.managers.request_validation import MAX_TOP_LOGPROBS, InvalidRequestError


logger = logging.getLogger(__name__)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    name: str
    description: str | None = None
    # `schema` would shadow a pydantic BaseModel attribute.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> dict[str, str]:
        """The SamplingParams grammar field enforcing this format ({} for plain text).

        The schema is checked here, so that a bad one is a 400 before anything is queued,
        streamed or not."""
        if self.type == "text":
            return {}
        if self.type == "json_object":
            return {"json_schema": ANY_JSON}
        if self.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs a "
                                      "json_schema object", "response_format.json_schema")
        if self.json_schema.schema_ is None:  # OpenAI: no schema means any JSON
            return {"json_schema": ANY_JSON}
        schema = json.dumps(self.json_schema.schema_)
        try:
            json_schema_ebnf(schema)
        except GrammarError as exc:
            raise InvalidRequestError(f"response_format.json_schema.schema: {exc}",
                                      "response_format.json_schema.schema") from None
        return {"json_schema": schema}


_MODEL_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class _SamplingRequest(RequestModel):
    """The sampling fields both endpoints share; extras follow SGLang's names."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    # SGLang's grammar extras; with response_format too, the request is a 400.
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, Any] | None = None
    data_parallel_rank: Any = None  # SGLang's: the DP replica (sglang-router --dp-aware)
    # Prefill/decode disaggregation: the router sets these on both halves.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    def bootstrap_fields(self) -> dict[str, Any]:
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": self.bootstrap_room}

    def sampling_params(self, max_new_tokens: int | None) -> dict[str, Any]:
        """None for max_new_tokens means: whatever the context has left."""
        grammar = self.response_format.grammar() if self.response_format else {}
        # Fields the model's generation_config.json may default (request_validation.py)
        # are sent only when the client set them, so the model's defaults apply under
        # the client's values, as on /generate and in the offline Engine.
        model_defaultable = {name: getattr(self, name) for name in _MODEL_DEFAULTABLE
                             if name in self.model_fields_set}
        return {**grammar,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_tokens,
            **model_defaultable,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "no_stop_trim": self.no_stop_trim,
            "n": self.n,
            "seed": self.seed,
            "stop_regex": self.stop_regex,
            "regex": self.regex,
            "ebnf": self.ebnf,
            "logit_bias": self.logit_bias,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def check(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidRequestError("max_tokens must be >= 0", "max_tokens")


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """Any other content part: image_url and video_url are read by vision-language
    models (managers/multimodal_requests.chat_media, which refuses other types with a
    400 naming the part)."""

    model_config = ConfigDict(extra="allow")
    type: str


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(RequestModel):
    """A call an earlier assistant message made, sent back as conversation history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict[str, Any]:
        # Chat templates (following transformers' tool-use guide) index into the
        # arguments as a mapping; OpenAI sends them as a JSON string.
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | MediaPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    @property
    def has_media(self) -> bool:
        return isinstance(self.content, list) and any(
            not isinstance(part, TextPart) for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it."""
        content: Any = self.text()
        if self.has_media:  # parts, for chat_media to turn into the template's form
            content = [part.model_dump() for part in self.content]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    # None: OpenAI's default, "auto" when tools are given and "none" otherwise.
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    # SGLang's switch: false leaves a reasoning model's <think> block in the content.
    separate_reasoning: bool = True

    def check(self) -> None:
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(
                    f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                    "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequestError(f"{name} must be >= 0", name)

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


def parse_request(model: type[RequestModel], body: Any) -> Any:
    """Validate a JSON body into `model`, or raise InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", None)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    known = set(model.model_fields) | {
        f.alias for f in model.model_fields.values() if f.alias}
    unknown = sorted(set(body) - known)
    if unknown:
        # Clients send options radixserve does not implement; say so instead of
        # answering as if they had been applied.
        logger.warning("%s: ignoring unknown field(s) %s", model.__name__, unknown)
    check = getattr(request, "check", None)
    if check is not None:
        check()
    return request


def validation_error(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    # Union members add their type name to the location; keep only the field path.
    loc = [str(p) for p in first["loc"] if isinstance(p, int) or _is_field_name(p)]
    param = ".".join(loc) or None
    return InvalidRequestError(f"{param}: {first['msg']}" if param else first["msg"], param)


def error_body(message: str, param: str | None, status_code: int,
               error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param,
                      "code": status_code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field_name(part: str) -> bool:
    return part.isidentifier() and part[0].islower() and part not in _TYPE_TAGS


# --- responses ------------------------------------------------------------------

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def finish_reason(meta_info: dict[str, Any]) -> str | None:
    reason = meta_info.get("finish_reason")
    return None if reason is None else str(reason.get("type"))


def matched_stop(meta_info: dict[str, Any]) -> int | str | None:
    reason = meta_info.get("finish_reason") or {}
    return reason.get("matched") if reason.get("type") == "stop" else None


def usage(outputs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """OpenAI usage: each prompt counts once however many samples it has."""
    prompt = cached = completion = 0
    groups: dict[int, list[dict[str, Any]]] = {}
    for out in outputs:
        groups.setdefault(out["index"] // n, []).append(out["meta_info"])
    for metas in groups.values():
        prompt += metas[0]["prompt_tokens"]
        cached += max(m["cached_tokens"] for m in metas)
        completion += sum(m["completion_tokens"] for m in metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
