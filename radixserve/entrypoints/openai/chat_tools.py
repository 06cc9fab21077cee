"""What a chat request's `tools` and `tool_choice` mean for its prompt, sampling and output.

* "none" (or no tools): the template sees no tools and the output is not parsed.
* "auto": the template sees the tools; the output is parsed for calls when the server
  has a --tool-call-parser, but nothing forces the model to call.
* "required" / a named function: as "auto", plus the parser's grammar, which makes the
  model write at least one call (or exactly one call of that function) in the parser's
  own format, so that what it writes is what the parser reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.parsers import ToolCallParser, get_tool_call_parser


@dataclass
class ToolPlan:
    template_tools: list[dict[str, Any]] | None = None  # what the chat template receives
    parser: ToolCallParser | None = None  # None: the output is plain content
    grammar: dict[str, str] = field(default_factory=dict)  # {"ebnf": ...} to force a call


def plan_tools(req: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    """The plan for `req` on a server with tool-call parser `parser_name` (or none);
    raises InvalidRequestError for a tool_choice that cannot be honoured."""
    choice = req.effective_tool_choice
    if choice == "none":
        return ToolPlan()
    if not req.tools:
        raise InvalidRequestError("tool_choice other than 'none' needs tools", "tool_choice")
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    parser = get_tool_call_parser(parser_name) if parser_name else None
    if choice == "auto":
        return ToolPlan(tools, parser)
    if parser is None:
        raise InvalidRequestError("tool_choice 'required' or a named function needs a server "
                                  "started with --tool-call-parser", "tool_choice")
    if req.response_format is not None and req.response_format.type != "text":
        raise InvalidRequestError("response_format cannot be combined with tool_choice "
                                  "'required' or a named function", "response_format")
    if isinstance(choice, NamedToolChoice):
        names = [tool.function.name for tool in req.tools]
        if choice.function.name not in names:
            raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, "
                                      f"which is not among the tools {names}", "tool_choice")
    wanted = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    try:
        ebnf = parser.tool_choice_grammar(tools, wanted, req.parallel_tool_calls)
    except ValueError as exc:  # a tool without a usable parameters schema
        raise InvalidRequestError(str(exc), "tools") from None
    return ToolPlan(tools, parser, {"ebnf": ebnf})
