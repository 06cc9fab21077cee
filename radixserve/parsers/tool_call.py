"""Tool-call parsing: the shared machinery; each format is a subclass with one `scan`.

A format's `scan(text, final)` reads a (possibly still growing) message and returns the
content and the calls as far as they are certain. Both ways of parsing use it:

* `parse(text)`: one scan of the whole message.
* `stream()`: after each chunk, rescan the text so far and emit what is new since the
  last scan, as OpenAI-style deltas.

Because a scan of a prefix is always a prefix of the final scan (content held back
while it might still turn into a call marker, arguments kept as raw text), the streamed
deltas concatenate to exactly the non-streamed result.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from radixserve.parsers.json_scan import PartialCall, scan_call, skip_ws
from radixserve.parsers.tool_grammar import CallFormat, tool_choice_grammar


@dataclass
class Scan:
    content: str = ""
    calls: list[PartialCall] = field(default_factory=list)


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedMessage:
    content: str  # the text outside the calls
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """One streamed piece: content text, or a fragment of tool call `index`."""

    content: str | None = None
    index: int | None = None
    id: str | None = None  # on a call's first delta only, with its name
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The `delta` object of an OpenAI chat.completion.chunk."""
        if self.index is None:
            return {"content": self.content}
        function: dict[str, Any] = {}
        call: dict[str, Any] = {"index": self.index, "function": function}
        if self.id is not None:
            call.update(id=self.id, type="function")
            function["name"] = self.name
        if self.arguments is not None:
            function["arguments"] = self.arguments
        return {"tool_calls": [call]}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser(ABC):
    name: ClassVar[str]
    call_format: ClassVar[CallFormat]

    @abstractmethod
    def scan(self, text: str, final: bool) -> Scan:
        """The content and calls of `text`; unless `final`, only what more text cannot change."""

    def has_tool_call(self, text: str) -> bool:
        return any(c.name is not None for c in self.scan(text, final=True).calls)

    def parse(self, text: str) -> ParsedMessage:
        scan = self.scan(text, final=True)
        named = [c for c in scan.calls if c.name is not None]
        return ParsedMessage(scan.content, [ToolCall(i, new_call_id(), str(c.name), c.arguments)
                                            for i, c in enumerate(named)])

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)

    def tool_choice_grammar(self, tools: list[dict[str, Any]], tool_choice: str | dict[str, Any],
                            parallel_tool_calls: bool = True) -> str:
        """EBNF (for SamplingParams.ebnf) that makes the model call the tools in this
        format: see tool_grammar.tool_choice_grammar."""
        return tool_choice_grammar(self.call_format, tools, tool_choice, parallel_tool_calls)


class ToolCallStream:
    """Streaming state for one message: feed text deltas, get ToolCallDeltas."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.text = ""
        self._content_sent = 0
        self._args_sent: list[int] = []  # per emitted call: arguments chars sent

    def feed(self, delta: str) -> list[ToolCallDelta]:
        self.text += delta
        return self._emit_new(self.parser.scan(self.text, final=False))

    def finish(self) -> list[ToolCallDelta]:
        """Whatever was held back, once the message is complete."""
        return self._emit_new(self.parser.scan(self.text, final=True))

    def _emit_new(self, scan: Scan) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if len(scan.content) > self._content_sent:
            out.append(ToolCallDelta(content=scan.content[self._content_sent:]))
            self._content_sent = len(scan.content)
        named = [c for c in scan.calls if c.name is not None]
        for index, call in enumerate(named):
            if index == len(self._args_sent):
                out.append(ToolCallDelta(index=index, id=new_call_id(), name=call.name,
                                         arguments=""))
                self._args_sent.append(0)
            if len(call.arguments) > self._args_sent[index]:
                out.append(ToolCallDelta(index=index,
                                         arguments=call.arguments[self._args_sent[index]:]))
                self._args_sent[index] = len(call.arguments)
        return out


# --- helpers for the formats ------------------------------------------------------------


def hold_back(segment: str, markers: tuple[str, ...]) -> str:
    """`segment` without an ending that may still grow into a marker, and without the
    whitespace that would then precede the marker (it is dropped next to calls)."""
    for k in range(min(len(segment), max(len(m) for m in markers) - 1), 0, -1):
        if any(m.startswith(segment[-k:]) for m in markers):
            segment = segment[:-k]
            break
    return segment.rstrip()


def join_content(segments: list[str]) -> str:
    """The text around calls: the non-empty pieces, one per line."""
    return "\n".join(s for s in segments if s)


def scan_call_list(text: str, i: int, separators: str, final: bool,
                   calls: list[PartialCall]) -> int | None:
    """Scan calls `{...}` separated by any of `separators` from text[i]; append them to
    `calls`. Returns where the list ends (the first other character), or None when the
    text ends inside it."""
    while True:
        i = skip_ws(text, i)
        if i == len(text):
            return None
        if text[i] != "{":
            return i
        call, end = scan_call(text, i, final)
        calls.append(call)
        if end is None:
            return None
        i = skip_ws(text, end)
        if i == len(text):
            # A separator may follow; at the end of the message the list is complete.
            return i if final else None
        if text[i] not in separators:
            return i
        i += 1
