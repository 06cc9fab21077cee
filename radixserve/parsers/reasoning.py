"""Reasoning parsers: split `<think>…</think>` from the answer.

Like the tool-call parsers, one `scan(text, final)` serves both ways: `parse` scans the
whole message; a stream rescans after each chunk and emits what is new, holding back a
tail that may still become a tag. Reasoning is stripped of surrounding whitespace, the
answer of leading whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.parsers.tool_call import hold_back


@dataclass
class ReasoningResult:
    reasoning_content: str
    content: str


class ReasoningParser:
    """`force_reasoning`: the message starts inside the reasoning even without `<think>`
    (the chat template already opened it, as DeepSeek-R1's does): text before `</think>`
    is reasoning, and all of it when `</think>` never comes. Otherwise a message that does
    not open with `<think>` has no reasoning."""

    START = "<think>"
    END = "</think>"

    def __init__(self, force_reasoning: bool = False) -> None:
        self.force_reasoning = force_reasoning

    def scan(self, text: str, final: bool) -> ReasoningResult:
        i = len(text) - len(text.lstrip())
        if text.startswith(self.START, i):
            begin = i + len(self.START)
        elif not final and self.START.startswith(text[i:]):
            return ReasoningResult("", "")  # may still become <think>
        elif self.force_reasoning:
            begin = 0
        else:
            return ReasoningResult("", text)
        end = text.find(self.END, begin)
        if end < 0:
            thought = text[begin:] if final else hold_back(text[begin:], (self.END,))
            return ReasoningResult(thought.strip(), "")
        return ReasoningResult(text[begin:end].strip(), text[end + len(self.END):].lstrip())

    def parse(self, text: str) -> ReasoningResult:
        return self.scan(text, final=True)

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)


class ReasoningStream:
    """Streaming state for one message: feed text deltas, get (reasoning, content) deltas."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self._sent = ReasoningResult("", "")

    def feed(self, delta: str) -> ReasoningResult:
        self.text += delta
        return self._emit_new(self.parser.scan(self.text, final=False))

    def finish(self) -> ReasoningResult:
        return self._emit_new(self.parser.scan(self.text, final=True))

    def _emit_new(self, now: ReasoningResult) -> ReasoningResult:
        new = ReasoningResult(now.reasoning_content[len(self._sent.reasoning_content):],
                              now.content[len(self._sent.content):])
        self._sent = now
        return new


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek-r1"

    def __init__(self, force_reasoning: bool = True) -> None:
        super().__init__(force_reasoning)
