"""RequestLimits: how much one request may ask of the server (the hardening flags).

Each bounds work that a single request could otherwise make unbounded before any
check runs: parsing the body, copying it n times, matching many stop strings,
tokenizing a huge prompt, building a huge bias table. The HTTP layer enforces the
body size and JSON depth; RequestValidator (the one validation path) the rest, for
the server and the offline Engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass

# Samples per prompt: OpenAI's own cap. The copies of a request are built before anything
# runs, so an unbounded n stalls every other request.
DEFAULT_MAX_N = 128


@dataclass(frozen=True)
class RequestLimits:
    max_request_body_bytes: int = 64 << 20
    max_json_depth: int = 64
    max_n: int = DEFAULT_MAX_N
    max_stop_strings: int = 64
    max_prompt_bytes: int = 16 << 20
    max_logit_bias_entries: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
