"""Tool-call and reasoning parsers, selected by --tool-call-parser / --reasoning-parser.

The OpenAI layer runs the reasoning parser first and the tool-call parser on the content
it leaves; both parse whole messages (`parse`) and streams (`stream()`), and agree.
"""

from __future__ import annotations

from radixserve.parsers.reasoning import (DeepSeekR1ReasoningParser, Qwen3ReasoningParser,
                                          ReasoningParser, ReasoningResult, ReasoningStream)
from radixserve.parsers.tool_call import (ParsedMessage, ToolCall, ToolCallDelta, ToolCallParser,
                                          ToolCallStream)
from radixserve.parsers.tool_formats import HermesParser, Llama3Parser, MistralParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen25": HermesParser, "hermes": HermesParser, "llama3": Llama3Parser,
    "mistral": MistralParser,
}
REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser, "deepseek-r1": DeepSeekR1ReasoningParser,
}


def get_tool_call_parser(name: str) -> ToolCallParser:
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose from "
                         f"{sorted(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]()


def get_reasoning_parser(name: str, force_reasoning: bool | None = None) -> ReasoningParser:
    """`force_reasoning` (None: the parser's default) is for chat templates that open
    the <think> block in the prompt (e.g. Qwen3 thinking models)."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from "
                         f"{sorted(REASONING_PARSERS)}")
    cls = REASONING_PARSERS[name]
    return cls() if force_reasoning is None else cls(force_reasoning)


__all__ = ["REASONING_PARSERS", "TOOL_CALL_PARSERS", "ParsedMessage", "ReasoningParser",
           "ReasoningResult", "ReasoningStream", "ToolCall", "ToolCallDelta", "ToolCallParser",
           "ToolCallStream", "get_reasoning_parser", "get_tool_call_parser"]
