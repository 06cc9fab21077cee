"""--log-requests: one line when a request arrives and one when it finishes, with as
much of it as --log-requests-level asks (SGLang's levels)."""

from __future__ import annotations

import dataclasses
from typing import Any

# Level 2 logs this many characters of each end of the input and output text.
PARTIAL_CHARS = 1024


def _text(text: str | None, level: int) -> str | None:
    if text is None or level >= 3 or len(text) <= 2 * PARTIAL_CHARS:
        return text
    return f"{text[:PARTIAL_CHARS]}...{text[-PARTIAL_CHARS:]}"


def receive_line(rid: str, input_text: str | None, input_ids: list[int],
                 sampling_params: Any, level: int) -> str:
    fields: dict[str, Any] = {"rid": rid, "prompt_tokens": len(input_ids)}
    if level >= 1:
        fields["sampling_params"] = (dataclasses.asdict(sampling_params)
                                     if dataclasses.is_dataclass(sampling_params)
                                     else sampling_params)
    if level >= 2:
        fields["text"] = _text(input_text, level)
    if level >= 3:
        fields["input_ids"] = input_ids
    return "Receive: " + ", ".join(f"{k}={v!r}" for k, v in fields.items())


def finish_line(rid: str, meta: dict[str, Any], output_text: str | None,
                output_ids: list[int] | None, level: int) -> str:
    fields: dict[str, Any] = {"rid": rid, **meta}
    if level >= 2:
        fields["text"] = _text(output_text, level)
    if level >= 3:
        fields["output_ids"] = output_ids
    return "Finish: " + ", ".join(f"{k}={v!r}" for k, v in fields.items())
