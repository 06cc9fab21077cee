"""Tool-call and reasoning parsers on hand-written model outputs, whole and streamed in
random chunkings (the two must agree exactly), and the tool_choice grammars they read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.parsers import get_reasoning_parser, get_tool_call_parser

# (parser, model output, expected content, expected [(name, arguments)])
TOOL_CASES = [
    ("hermes", 'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "days": 3}}\n</tool_call>',
     "Let me check the weather.", [("get_weather", {"city": "Paris", "days": 3})]),
    ("qwen25", '<tool_call>\n{"name": "a", "arguments": {"x": [1, 2, {"y": "}"}]}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {"s": "<tool_call> \\"q\\" </tool_call>"}}\n'
     '</tool_call>',
     "", [("a", {"x": [1, 2, {"y": "}"}]}), ("b", {"s": '<tool_call> "q" </tool_call>'})]),
    ("hermes", 'First.\n<tool_call>\n{"arguments": {"n": 12}, "name": "late_name"}\n</tool_call>\n'
     'Then more text.\n', "First.\nThen more text.\n", [("late_name", {"n": 12})]),
    ("hermes", "No call here, only a <tool mention.", "No call here, only a <tool mention.", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}', "",
     [("get_weather", {"city": "Rome", "days": 1})]),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {"q": "x;y"}}; {"name": "b", '
     '"arguments": {"n": -1.5e3}}', "", [("a", {"q": "x;y"}), ("b", {"n": -1500.0})]),
    ("llama3", 'Sure, calling now. <|python_tag|>{"name": "f", "parameters": {}}',
     "Sure, calling now.", [("f", {})]),
    ("llama3", '{"name": "n", "parameters": {"v": 12}}', "", [("n", {"v": 12})]),
    ("llama3", '{"foo": 1} is plain JSON', '{"foo": 1} is plain JSON', []),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", '
     '"arguments": {"y": "]"}}]', "", [("a", {"x": 1}), ("b", {"y": "]"})]),
    ("mistral", 'I will look it up.[TOOL_CALLS][{"name": "f", "arguments": {"q": "cats"}}]',
     "I will look it up.", [("f", {"q": "cats"})]),
    ("mistral", "Just text with [brackets] and [TOOL", "Just text with [brackets] and [TOOL", []),
]

REASONING_CASES = [
    ("qwen3", None, "<think>\nI think.\n</think>\n\nThe answer.", "I think.", "The answer."),
    ("qwen3", None, "Hello <b>world</b>", "", "Hello <b>world</b>"),
    ("qwen3", None, "<think>still thinking", "still thinking", ""),
    ("qwen3", True, "Opened by the template.</think>Answer", "Opened by the template.", "Answer"),
    ("deepseek-r1", None, "Reasoning here.\n</think>\n\nAnswer <x>", "Reasoning here.",
     "Answer <x>"),
    ("deepseek-r1", None, "<think>R</think>A", "R", "A"),
    ("deepseek-r1", None, "only reasoning, never closed", "only reasoning, never closed", ""),
]


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def stream_tool_calls(name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    stream = get_tool_call_parser(name).stream()
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    content = ""
    calls: list[list[str]] = []
    for d in deltas:
        wire = d.to_openai()
        if "content" in wire:
            content += wire["content"]
            continue
        (call,) = wire["tool_calls"]
        if call["index"] == len(calls):  # a call's first delta carries its id and name
            assert call["id"].startswith("call_") and call["type"] == "function"
            assert call["function"]["arguments"] == ""
            calls.append([call["function"]["name"], ""])
        else:
            assert "id" not in call and "name" not in call["function"]
        calls[call["index"]][1] += call["function"]["arguments"]
    return content, [(n, a) for n, a in calls]


@pytest.mark.parametrize("name,text,content,calls", TOOL_CASES)
def test_tool_call_parse(name, text, content, calls):
    parsed = get_tool_call_parser(name).parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert [c.index for c in parsed.tool_calls] == list(range(len(calls)))
    assert len({c.id for c in parsed.tool_calls}) == len(calls)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(TOOL_CASES), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_tool_call_stream_equals_parse(case, cuts):
    name, text = case[0], case[1]
    parsed = get_tool_call_parser(name).parse(text)
    content, calls = stream_tool_calls(name, chunks(text, cuts))
    assert content == parsed.content
    assert calls == [(c.name, c.arguments) for c in parsed.tool_calls]


def test_tool_call_stream_char_by_char_emits_early():
    """Content and arguments flow while the call is still being written."""
    text = TOOL_CASES[0][1]
    stream = get_tool_call_parser("hermes").stream()
    prefix = text[:text.index('"days"')]
    deltas = [d for ch in prefix for d in stream.feed(ch)]
    assert "".join(d.content or "" for d in deltas) == "Let me check the weather."
    assert any(d.name == "get_weather" for d in deltas)
    assert "".join(d.arguments or "" for d in deltas) == '{"city": "Paris",'


@pytest.mark.parametrize("name,force,text,reasoning,content", REASONING_CASES)
def test_reasoning_parse(name, force, text, reasoning, content):
    result = get_reasoning_parser(name, force).parse(text)
    assert (result.reasoning_content, result.content) == (reasoning, content)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(REASONING_CASES), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_reasoning_stream_equals_parse(case, cuts):
    name, force, text, reasoning, content = case
    stream = get_reasoning_parser(name, force).stream()
    deltas = [stream.feed(piece) for piece in chunks(text, cuts)] + [stream.finish()]
    assert "".join(d.reasoning_content for d in deltas) == reasoning
    assert "".join(d.content for d in deltas) == content


def test_unknown_parser_names():
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_call_parser("nope")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {}}}},
]


def _written_call(fmt, name: str, arguments: str) -> str:
    return fmt.call_begin.replace("{name}", json.dumps(name)) + arguments + fmt.call_end


@pytest.mark.parametrize("name", ["hermes", "llama3", "mistral"])
def test_tool_choice_grammar_accepts_what_the_parser_reads(name):
    """A message written in the format's own layout is in the grammar and parses back."""
    import xgrammar as xgr

    parser = get_tool_call_parser(name)
    fmt = parser.call_format
    calls = [_written_call(fmt, "get_weather", '{"city": "Rome", "days": 2}'),
             _written_call(fmt, "ping", "{}")]
    message = fmt.prefix + fmt.separator.join(calls) + fmt.suffix
    grammar = xgr.Grammar.from_ebnf(parser.tool_choice_grammar(TOOLS, "required"))
    assert xgr.testing._is_grammar_accept_string(grammar, message)
    assert [(c.name, json.loads(c.arguments)) for c in parser.parse(message).tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 2}), ("ping", {})]
    named = xgr.Grammar.from_ebnf(parser.tool_choice_grammar(
        TOOLS, {"type": "function", "function": {"name": "ping"}}))
    assert not xgr.testing._is_grammar_accept_string(named, message)  # one call, of ping only
    assert xgr.testing._is_grammar_accept_string(named, fmt.prefix + calls[1] + fmt.suffix)
    wrong_days = fmt.prefix + _written_call(fmt, "get_weather", '{"city": "Rome", "days": 9}')
    assert not xgr.testing._is_grammar_accept_string(grammar, wrong_days + fmt.suffix)


def test_tool_choice_grammar_errors():
    parser = get_tool_call_parser("hermes")
    with pytest.raises(ValueError, match="not among the tools"):
        parser.tool_choice_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="'auto'"):
        parser.tool_choice_grammar(TOOLS, "auto")
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    with pytest.raises(ValueError, match="'f' has an invalid parameters schema"):
        parser.tool_choice_grammar(bad, "required")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
CALLS = st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
                           st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)),
                 min_size=1, max_size=3)
PLAIN_TEXT = st.text(alphabet="abc xyz.,!?\n", max_size=30)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["hermes", "llama3", "mistral"]), calls=CALLS, before=PLAIN_TEXT,
       cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_generated_calls_round_trip(name, calls, before, cuts):
    parser = get_tool_call_parser(name)
    fmt = parser.call_format
    written = [_written_call(fmt, n, json.dumps(args)) for n, args in calls]
    message = fmt.prefix + fmt.separator.join(written) + fmt.suffix
    if name == "llama3":
        message = "<|python_tag|>" + message
    message = before + message
    parsed = parser.parse(message)
    assert parsed.content == before.rstrip()  # whitespace next to a call is dropped
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    content, streamed = stream_tool_calls(name, chunks(message, cuts))
    assert content == parsed.content
    assert streamed == [(c.name, c.arguments) for c in parsed.tool_calls]
