"""The grammar that enforces tool_choice "required" or a named function.

It is an EBNF string for SamplingParams.ebnf, written in the parser's own CallFormat,
so the parser reads back exactly what the grammar lets the model write. Each call's
arguments follow its function's JSON schema, compiled exactly as json_schema requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from radixserve.constrained.xgrammar_backend import json_schema_ebnf


@dataclass(frozen=True)
class CallFormat:
    """How a tool-call format lays out calls; its parser reads exactly this back."""

    prefix: str  # before the first call
    call_begin: str  # before each call's arguments; "{name}" is the JSON-quoted name
    call_end: str  # after each call's arguments
    separator: str  # between two calls
    suffix: str  # after the last call


def tool_choice_grammar(call_format: CallFormat, tools: list[dict[str, Any]],
                        tool_choice: str | dict[str, Any],
                        parallel_tool_calls: bool = True) -> str:
    """EBNF forcing at least one call (`"required"`) or one call of the named function
    (`{"type": "function", "function": {"name": ...}}`); tools in OpenAI's format.

    Raises ValueError for an unknown tool name or an invalid parameters schema."""
    import xgrammar as xgr

    functions = [t["function"] if "function" in t else t for t in tools]
    named = isinstance(tool_choice, dict)
    if named:
        wanted = tool_choice.get("function", {}).get("name")
        functions = [f for f in functions if f.get("name") == wanted]
        if not functions:
            raise ValueError(f"tool_choice names {wanted!r}, which is not among the tools")
    elif tool_choice != "required":
        raise ValueError(f"a grammar enforces only tool_choice 'required' or a named "
                         f"function, not {tool_choice!r}")
    if not functions:
        raise ValueError("tool_choice 'required' needs at least one tool")
    calls = {"type": "tags_with_separator", "separator": call_format.separator,
             "at_least_one": True, "stop_after_first": named or not parallel_tool_calls,
             "tags": [_call_tag(call_format, f) for f in functions]}
    parts = [{"type": "const_string", "value": s} for s in (call_format.prefix,) if s]
    parts += [calls] + [{"type": "const_string", "value": s} for s in (call_format.suffix,) if s]
    layout = calls if len(parts) == 1 else {"type": "sequence", "elements": parts}
    tag = {"type": "structural_tag", "format": layout}
    return str(xgr.Grammar.from_structural_tag(json.dumps(tag)))


def _call_tag(call_format: CallFormat, function: dict[str, Any]) -> dict[str, Any]:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"every tool needs a function name, got {name!r}")
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    try:
        arguments = json_schema_ebnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 -- xgrammar raises RuntimeError from C++
        raise ValueError(f"tool {name!r} has an invalid parameters schema: {e}") from None
    return {"type": "tag", "begin": call_format.call_begin.replace("{name}", json.dumps(name)),
            "content": {"type": "grammar", "grammar": arguments}, "end": call_format.call_end}
