"""Tools, tool_choice, response_format and reasoning output on the OpenAI API.

Server tests use the official openai client against the session server (the real
SmolLM2, started with --tool-call-parser qwen25 --reasoning-parser qwen3): grammars make
it write calls and JSON that validate against their schemas. A small model does not
think on demand, so the reasoning/tool assembly is unit-tested on hand-written outputs.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import jsonschema
import openai
import pytest

from radixserve.configs.request_limits import RequestLimits
from radixserve.entrypoints.openai.chat_output import (MessageStream, OutputParsers,
                                                       chat_finish_reason, parse_message)
from radixserve.entrypoints.openai.chat_tools import plan_tools
from radixserve.entrypoints.openai.protocol import ChatCompletionRequest
from radixserve.entrypoints.openai.serving_chat import apply_chat_template, output_parsers
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.parsers import get_reasoning_parser, get_tool_call_parser
from tests.conftest import LiveServer

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "Weather forecast for a city"}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age"]}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, timeout=120)


def streamed_message(chunks: list[Any]) -> tuple[dict[str, Any], str | None]:
    """Join a stream's deltas the way OpenAI clients do: (message, finish_reason)."""
    content, reasoning, calls, reason = "", "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta.model_dump()
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or []:
            joined = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            joined["id"] = joined["id"] or call.get("id")
            joined["name"] = joined["name"] or call["function"].get("name")
            joined["arguments"] += call["function"].get("arguments") or ""
        reason = choice.finish_reason or reason
    return {"content": content, "reasoning_content": reasoning,
            "tool_calls": [calls[i] for i in sorted(calls)]}, reason


def assert_valid_calls(calls: list[tuple[str, str]], allowed: set[str]) -> None:
    assert calls, "no tool call"
    for name, arguments in calls:
        assert name in allowed
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# --- through the server -------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"])
def test_forced_tool_calls_validate(client: openai.OpenAI, tool_choice: Any) -> None:
    kwargs = dict(model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                  parallel_tool_calls=False, max_tokens=96, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    allowed = {"add"} if isinstance(tool_choice, dict) else set(SCHEMAS)
    assert_valid_calls(calls, allowed)
    assert len(calls) == 1 and whole.finish_reason == "tool_calls"
    assert whole.message.tool_calls[0].id.startswith("call_")
    assert whole.message.tool_calls[0].type == "function"
    assert not whole.message.content

    message, reason = streamed_message(list(client.chat.completions.create(**kwargs,
                                                                           stream=True)))
    assert [(c["name"], c["arguments"]) for c in message["tool_calls"]] == calls
    assert all(c["id"] for c in message["tool_calls"]) and reason == "tool_calls"


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    kwargs = dict(model="m", max_tokens=96, temperature=0,
                  messages=[{"role": "user", "content": "Describe a person."}],
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "person", "schema": PERSON, "strict": True}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    assert whole.finish_reason == "stop"
    message, _ = streamed_message(list(client.chat.completions.create(**kwargs, stream=True)))
    assert message["content"] == whole.message.content


def test_response_format_json_object(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(
        model="m", max_tokens=96, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "List three colors as a JSON object."}])
    assert isinstance(json.loads(got.choices[0].message.content), (dict, list))


def test_completions_response_format(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model="m", prompt="A person:", max_tokens=64, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON}}})
    jsonschema.validate(json.loads(got.choices[0].text), PERSON)


def test_native_generate_grammars(server: LiveServer) -> None:
    with server.client() as c:
        got = c.post("/generate", json={"text": "Is the sky blue?", "sampling_params": {
            "regex": r"(yes|no), [0-9]{1,3}", "max_new_tokens": 16, "temperature": 0}})
        assert re.fullmatch(r"(yes|no), [0-9]{1,3}", got.raise_for_status().json()["text"])
        bad = c.post("/generate", json={"text": "Hi", "sampling_params": {"regex": "[a-"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "regex"
    assert "invalid regex" in bad.json()["error"]["message"]


def test_bad_grammars_get_400_while_plain_request_finishes(client: openai.OpenAI,
                                                           server: LiveServer) -> None:
    def plain() -> Any:
        return client.chat.completions.create(model="m", messages=ASK, max_tokens=24,
                                              temperature=0, extra_body={"ignore_eos": True})

    def bad_schema(stream: bool) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="m", messages=ASK, max_tokens=8, stream=stream, response_format={
                    "type": "json_schema", "json_schema": {"name": "x", "schema": {
                        "type": "object", "properties": {"n": {"type": "nonsense"}}}}})
        return info.value

    def bad_native() -> Any:  # rejected by the scheduler's compile, not the HTTP layer
        with server.client() as c:
            return c.post("/generate", json={"text": "Hi", "sampling_params": {
                "json_schema": json.dumps({"type": "integer", "minimum": 5, "maximum": 1})}})

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(plain)
        errors = [pool.submit(bad_schema, s) for s in (False, True)]
        native = pool.submit(bad_native)
        for error in errors:
            err = error.result()
            assert err.status_code == 400 and "nonsense" in err.body["message"]
            assert err.body["param"] == "response_format.json_schema.schema"
        assert native.result().status_code == 400
        assert "minimum greater than maximum" in native.result().json()["error"]["message"]
        done = running.result().choices[0]
    assert done.finish_reason == "length" and done.message.content
    server.wait_idle()


@pytest.mark.parametrize("body,param,message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}],
      "tool_choice": "required"}, "tools", "invalid parameters schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
])
def test_invalid_tool_requests_get_400(client: openai.OpenAI, body: dict[str, Any], param: str,
                                       message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=4, extra_body=body)
    assert info.value.body["param"] == param and message in info.value.body["message"]


def test_tool_history_and_auto_choice(client: openai.OpenAI) -> None:
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20 C"}]
    got = client.chat.completions.create(model="m", messages=history, tools=TOOLS,
                                         max_tokens=8, temperature=0).choices[0]
    # Nothing forces a call under "auto"; SmolLM2 answers in text.
    assert got.message.content and not got.message.tool_calls
    assert got.finish_reason == "length"


# --- the serving layer on hand-written outputs ---------------------------------------------

OUTPUTS = [
    '<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n{"name": '
    '"get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}\n</tool_call>',
    '<think>Two sums.</think><tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
    '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
    "<think>no tools needed</think>Plain <b>answer</b>.",
    "No reasoning, no calls: <tool but not a call.",
    '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 6}}\n</tool_call>',
    "<think>unfinished thought",
]
PARSER_SETS = {
    "reasoning+tools": OutputParsers(get_reasoning_parser("qwen3"),
                                     get_tool_call_parser("qwen25")),
    "reasoning": OutputParsers(get_reasoning_parser("qwen3")),
    "tools": OutputParsers(tools=get_tool_call_parser("hermes")),
    "none": OutputParsers(),
}


def stream_message(text: str, parsers: OutputParsers, rng: random.Random) -> dict[str, Any]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream = MessageStream(parsers)
    deltas = [stream.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    chunks = [SimpleNamespace(choices=[SimpleNamespace(
        delta=SimpleNamespace(model_dump=lambda d=d: d), finish_reason=None)]) for d in deltas]
    message, _ = streamed_message(chunks)
    message["made_calls"] = stream.made_calls
    return message


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    calls = [(c["function"]["name"], c["function"]["arguments"])
             for c in message.get("tool_calls") or []]
    return {"content": message["content"] or "",
            "reasoning_content": message.get("reasoning_content") or "", "calls": calls}


@pytest.mark.parametrize("name", list(PARSER_SETS))
@pytest.mark.parametrize("text", OUTPUTS)
def test_streamed_assembly_equals_whole(text: str, name: str) -> None:
    parsers = PARSER_SETS[name]
    whole = parse_message(text, parsers)
    rng = random.Random(f"{name}/{text}")
    for _ in range(20):
        got = stream_message(text, parsers, rng)
        assert got["made_calls"] == ("tool_calls" in whole)
        got["tool_calls"] = [{"function": c} for c in got["tool_calls"]]
        assert comparable(got) == comparable(whole)


def test_whole_message_fields() -> None:
    parsers = PARSER_SETS["reasoning+tools"]
    message = parse_message(OUTPUTS[0], parsers)
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Let me check."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius",
                                                         "days": 3}
    two = parse_message(OUTPUTS[1], parsers)
    assert two["content"] is None and len(two["tool_calls"]) == 2
    assert parse_message(OUTPUTS[2], parsers) == {"role": "assistant", "content":
                                                  "Plain <b>answer</b>.", "reasoning_content":
                                                  "no tools needed"}
    assert parse_message(OUTPUTS[2], OutputParsers()) == {"role": "assistant",
                                                          "content": OUTPUTS[2]}
    assert chat_finish_reason("stop", True) == "tool_calls"
    assert chat_finish_reason("length", True) == "length"
    assert chat_finish_reason("stop", False) == "stop"


def chat_request(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": ASK, **body})


def test_plan_tools() -> None:
    assert plan_tools(chat_request(tools=TOOLS, tool_choice="none"), "qwen25").template_tools \
        is None
    auto = plan_tools(chat_request(tools=TOOLS), None)
    assert auto.template_tools == TOOLS and auto.parser is None and not auto.grammar
    forced = plan_tools(chat_request(tools=TOOLS, tool_choice="required"), "mistral")
    assert "[TOOL_CALLS]" in forced.grammar["ebnf"] and forced.parser.name == "mistral"
    with pytest.raises(InvalidRequestError, match="--tool-call-parser"):
        plan_tools(chat_request(tools=TOOLS, tool_choice="required"), None)


class _RecordingTokenizer:
    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "prompt"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [1, 2]


def test_template_receives_tools_and_history() -> None:
    tokenizer = _RecordingTokenizer()
    tm = SimpleNamespace(tokenizer=tokenizer, server_args=SimpleNamespace(
        reasoning_parser="qwen3", tool_call_parser="qwen25"),
        validator=SimpleNamespace(request_limits=RequestLimits()))
    req = chat_request(tools=TOOLS, messages=ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}])
    plan = plan_tools(req, "qwen25")
    assert apply_chat_template(tm, req, plan.template_tools) == ([1, 2], [])  # no media
    messages, kwargs = tokenizer.calls[0]
    assert kwargs["tools"] == TOOLS and kwargs["add_generation_prompt"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert messages[2] == {"role": "tool", "content": "3", "tool_call_id": "c1"}
    assert output_parsers(tm, req, plan).reasoning is not None
    assert output_parsers(tm, chat_request(separate_reasoning=False), plan).reasoning is None
