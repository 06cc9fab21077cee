"""A chat choice's output text → the OpenAI message (whole) or deltas (streamed).

The reasoning parser runs first and the tool-call parser reads the content it leaves.
Both parsers make a stream's pieces concatenate to exactly the whole-message result, so
a streamed choice carries the same content, reasoning and calls as a non-streamed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.parsers import ReasoningParser, ToolCallDelta, ToolCallParser


@dataclass(frozen=True)
class OutputParsers:
    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None  # None: calls are not parsed out of the content


def parse_message(text: str, parsers: OutputParsers) -> dict[str, Any]:
    """The `message` of a non-streamed choice."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if parsers.reasoning is not None:
        split = parsers.reasoning.parse(text)
        message["reasoning_content"] = split.reasoning_content or None
        message["content"] = split.content
    if parsers.tools is not None:
        parsed = parsers.tools.parse(message["content"])
        if parsed.tool_calls:
            # OpenAI sends null content next to calls when there is no text.
            message["content"] = parsed.content or None
            message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        else:
            message["content"] = parsed.content
    return message


def chat_finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """A message that stopped after writing calls finished to have them run."""
    return "tool_calls" if reason == "stop" and made_calls else reason


class MessageStream:
    """One streamed choice: turns its text deltas into OpenAI `delta` objects."""

    def __init__(self, parsers: OutputParsers) -> None:
        self._reasoning = parsers.reasoning.stream() if parsers.reasoning else None
        self._tools = parsers.tools.stream() if parsers.tools else None
        self.made_calls = False

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        """The delta for the next piece of text; `final` flushes what the parsers held
        back (a tail that might have become a tag)."""
        delta: dict[str, Any] = {}
        content = text
        if self._reasoning is not None:
            pieces = [self._reasoning.feed(text)]
            if final:
                pieces.append(self._reasoning.finish())
            reasoning = "".join(p.reasoning_content for p in pieces)
            content = "".join(p.content for p in pieces)
            if reasoning:
                delta["reasoning_content"] = reasoning
        if self._tools is None:
            delta["content"] = content
            return delta
        pieces = self._tools.feed(content) + (self._tools.finish() if final else [])
        delta["content"] = "".join(p.content for p in pieces if p.index is None and p.content)
        calls = merge_tool_call_deltas(pieces)
        if calls:
            delta["tool_calls"] = calls
            self.made_calls = True
        return delta


def merge_tool_call_deltas(pieces: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The OpenAI `tool_calls` entries of one chunk: a call's fragments joined, so each
    call appears once."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        if piece.index is None:
            continue
        entry = piece.to_openai()["tool_calls"][0]
        if piece.index not in calls:
            calls[piece.index] = entry
            continue
        function = calls[piece.index]["function"]
        function["arguments"] = function.get("arguments", "") + (piece.arguments or "")
    return list(calls.values())

