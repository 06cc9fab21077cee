"""Stop regexes (SGLang's `stop_regex`): checked, and sized for the output tail.

A request stops once the text of its last output tokens matches one of its patterns.
The scheduler decodes only a tail of the output each step, as for stop strings: the
longest text a pattern can match, plus one token, bounds what the newest token can have
completed. A pattern without such a bound (`\\n+`) is run on a tail of at most
MAX_WINDOW tokens.

Patterns run on the scheduler's thread, so they use the `regex` package, which gives up
after MATCH_TIMEOUT_S (Python's `re` may backtrack for minutes on a pattern such as
`(a|aa)+$`, stalling every request); a request whose pattern times out is ended.
"""

from __future__ import annotations

import re
from typing import Any

import regex

try:
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERNS = 16
MAX_PATTERN_CHARS = 2048
MAX_WINDOW = 256
MATCH_TIMEOUT_S = 0.05


def as_list(value: Any) -> list[str]:
    """The non-empty patterns of a str, a list of str, or None."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p for p in items if p]


def compile_all(value: Any) -> list[regex.Pattern[str]]:
    """Check a stop_regex value; raise ValueError starting with the field's name."""
    if value is None:
        return []
    if not isinstance(value, (str, list)) or (
            isinstance(value, list) and not all(isinstance(p, str) for p in value)):
        raise ValueError("stop_regex must be a string or a list of strings")
    patterns = as_list(value)
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"stop_regex may hold at most {MAX_PATTERNS} patterns, "
                         f"got {len(patterns)}")
    compiled = []
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ValueError(f"stop_regex patterns may be at most {MAX_PATTERN_CHARS} "
                             f"characters, got {len(pattern)}")
        try:
            re.compile(pattern)  # the syntax `window` can size
            compiled.append(regex.compile(pattern))
        except (re.error, regex.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: "
                             f"{exc}") from None
    return compiled


def window(patterns: list[str]) -> int:
    """Output characters (so at most as many tokens) a match can span, capped."""
    longest = 0
    for pattern in patterns:
        try:
            _, hi = _sre_parse.parse(pattern).getwidth()
        except Exception:  # noqa: BLE001 - compile_all already refused bad patterns
            hi = MAX_WINDOW
        longest = max(longest, min(int(hi), MAX_WINDOW))
    return longest


def first_match(patterns: list[str], text: str) -> str | None:
    """The first pattern that matches somewhere in `text` (regex caches compiled ones);
    TimeoutError if one takes longer than MATCH_TIMEOUT_S."""
    for pattern in patterns:
        if regex.search(pattern, text, timeout=MATCH_TIMEOUT_S) is not None:
            return pattern
    return None
