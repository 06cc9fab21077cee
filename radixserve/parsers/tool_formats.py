"""The tool-call formats: where calls start in a message and how they are laid out."""

from __future__ import annotations

import re

from radixserve.parsers.json_scan import skip_ws
from radixserve.parsers.tool_call import (Scan, ToolCallParser, hold_back, join_content,
                                          scan_call_list)
from radixserve.parsers.tool_grammar import CallFormat


class HermesParser(ToolCallParser):
    """Hermes / Qwen 2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    one block per call, text allowed before, between and after the blocks."""

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"
    call_format = CallFormat(prefix="", call_begin='<tool_call>\n{"name": {name}, "arguments": ',
                             call_end="}\n</tool_call>", separator="\n", suffix="")

    def scan(self, text: str, final: bool) -> Scan:
        scan = Scan()
        segments: list[str] = []
        pos = 0
        while True:
            start = text.find(self.START, pos)
            segment = text[pos:] if start < 0 else text[pos:start]
            if pos > 0:  # after a call block
                segment = segment.lstrip()
            if start < 0:
                segments.append(segment if final else hold_back(segment, (self.START,)))
                break
            segments.append(segment.rstrip())
            end = scan_call_list(text, start + len(self.START), "", final, scan.calls)
            close = -1 if end is None else text.find(self.END, end)
            if close < 0:  # unfinished; at the end of the message, the rest is the call's
                break
            pos = close + len(self.END)
        scan.content = join_content(segments)
        return scan


class Llama3Parser(ToolCallParser):
    """Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, several separated by
    ";", opening the message or after `<|python_tag|>` (text before the tag is content)."""

    name = "llama3"
    TAG = "<|python_tag|>"
    _JSON_START = re.compile(r'\{\s*"name"')
    call_format = CallFormat(prefix="", call_begin='{"name": {name}, "parameters": ',
                             call_end="}", separator="; ", suffix="")

    def scan(self, text: str, final: bool) -> Scan:
        scan = Scan()
        i = skip_ws(text, 0)
        if self._JSON_START.match(text, i):
            head, body = "", i
        elif not final and _may_open_json_call(text[i:]):
            return scan
        else:
            tag = text.find(self.TAG)
            if tag < 0:
                scan.content = text if final else hold_back(text, (self.TAG,))
                return scan
            head, body = text[:tag].rstrip(), tag + len(self.TAG)
        end = scan_call_list(text, body, ";", final, scan.calls)
        scan.content = join_content([head, "" if end is None else text[end:].lstrip()])
        return scan


class MistralParser(ToolCallParser):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`; text before the
    marker is content."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    call_format = CallFormat(prefix="[TOOL_CALLS] [", call_begin='{"name": {name}, "arguments": ',
                             call_end="}", separator=", ", suffix="]")

    def scan(self, text: str, final: bool) -> Scan:
        scan = Scan()
        tag = text.find(self.TAG)
        if tag < 0:
            scan.content = text if final else hold_back(text, (self.TAG,))
            return scan
        i = skip_ws(text, tag + len(self.TAG))
        if text.startswith("[", i):  # the list's brackets are optional for one call
            i += 1
        end = scan_call_list(text, i, ",", final, scan.calls)
        tail = ""
        if end is not None:
            tail = text[end + 1 if text.startswith("]", end) else end:].lstrip()
        scan.content = join_content([text[:tag].rstrip(), tail])
        return scan


def _may_open_json_call(text: str) -> bool:
    """Whether more text could make `text` (no leading whitespace) a `{"name"` opening."""
    return text == "" or (text.startswith("{") and '"name"'.startswith(text[1:].lstrip()))
