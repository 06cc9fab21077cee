"""Scanning a tool call's JSON object in text that may still be growing.

Streaming parsers rescan the whole message after each chunk; the scan must then say
how much of a call is already certain. A call's arguments are kept as the raw text the
model wrote (not re-serialised), so the arguments of a partial message are always a
prefix of the final ones and streamed fragments concatenate to exactly the final text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Keys that hold a call's arguments, in the formats we parse ("parameters": Llama 3).
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PartialCall:
    """One tool call as far as the text so far determines it."""

    name: str | None = None  # known once its JSON string is complete
    arguments: str = ""  # raw JSON text of the arguments value (a prefix while partial)


def skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def scan_call(text: str, i: int, final: bool) -> tuple[PartialCall, int | None]:
    """Scan the call object starting at text[i] == "{".

    Returns the call and the index just after its closing brace, or None when the object
    is not complete (the text ends inside it, or it is malformed: then it never will be).
    A complete call without arguments gets "{}".
    """
    call = PartialCall()
    i = skip_ws(text, i + 1)
    if text.startswith("}", i):
        call.arguments = "{}"
        return call, i + 1
    while i < len(text):
        key, i = _decode_key(text, i)
        if key is None or i >= len(text) or text[i] != ":":
            break
        start = skip_ws(text, i + 1)
        end = _value_end(text, start, final)
        if key in ARGUMENT_KEYS and not call.arguments:
            # Trailing whitespace of an unfinished value may turn out to follow it.
            call.arguments = text[start:end if end is not None else len(text)].rstrip()
        if end is None:
            break
        if key == "name":
            name = json.loads(text[start:end])
            call.name = name if isinstance(name, str) else None
        i = skip_ws(text, end)
        if text.startswith("}", i):
            call.arguments = call.arguments or "{}"
            return call, i + 1
        if not text.startswith(",", i):
            break
        i = skip_ws(text, i + 1)
    return call, None


def _decode_key(text: str, i: int) -> tuple[str | None, int]:
    """A complete JSON string key at text[i] and the index after it and its whitespace."""
    if not text.startswith('"', i):
        return None, i
    try:
        key, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        return None, i
    return key, skip_ws(text, end)


def _value_end(text: str, i: int, final: bool) -> int | None:
    """End index of the complete JSON value at text[i], or None when it is unfinished."""
    try:
        _, end = _DECODER.raw_decode(text, i)
    except (json.JSONDecodeError, IndexError):
        return None
    # A number or literal that reaches the end of a growing text may still go on (12 → 123).
    if end == len(text) and not final and text[end - 1] not in '"}]':
        return None
    return end
