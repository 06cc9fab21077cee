"""Per-request sampling parameters, with the same names and defaults as SGLang."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-6


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    # Structured output (constrained/): at most one of these is set. json_schema "$$ANY$$"
    # (constrained.ANY_JSON) means any JSON object or array (OpenAI's json_object).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # Filled by normalize(): the stop strings as a list, their longest length in chars.
    stop_strs: list[str] = field(default_factory=list)
    stop_str_max_len: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        """Build from a JSON-like dict; unknown keys are an error naming the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"stop_strs", "stop_str_max_len"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {unknown}")
        params = cls(**{k: v for k, v in d.items() if v is not None or k in ("stop", "seed")})
        return params

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    def verify(self) -> None:
        """Raise ValueError naming the first invalid field."""
        _check_type("max_new_tokens", self.max_new_tokens, int)
        _check_type("min_new_tokens", self.min_new_tokens, int)
        _check_type("top_k", self.top_k, int)
        _check_type("n", self.n, int)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check_type(name, value, (int, float))
            if not math.isfinite(value):  # a NaN passes every range check below
                raise ValueError(f"{name} must be a finite number, got {value}")
        # The detokenizer and the stop-string check hand these to the tokenizer, which
        # fails on anything but a bool, in another process.
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got "
                                 f"{type(getattr(self, name)).__name__}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed is not None:
            _check_type("seed", self.seed, int)
        if self.stop is not None and not isinstance(self.stop, (str, list)):
            raise ValueError("stop must be a string or a list of strings")
        if isinstance(self.stop, list) and not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if self.stop_token_ids is not None and not (
            isinstance(self.stop_token_ids, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids)
        ):
            raise ValueError("stop_token_ids must be a list of integers")
        grammars = [g for g in (self.json_schema, self.regex, self.ebnf) if g is not None]
        if len(grammars) > 1:
            raise ValueError("only one of json_schema, regex, ebnf may be set")

    def normalize(self) -> None:
        """Derive the fields the scheduler reads; call after verify()."""
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop] if self.stop else []
        else:
            self.stop_strs = [s for s in self.stop if s]
        self.stop_str_max_len = max((len(s) for s in self.stop_strs), default=0)
        if self.temperature < _GREEDY_EPS:
            # Greedy is top-1 at temperature 1: one code path in the sampler.
            self.temperature = 1.0
            self.top_k = 1

    def copy_with_seed_offset(self, offset: int) -> "SamplingParams":
        """A copy for the offset-th of n parallel samples, so that n samples differ."""
        clone = SamplingParams(**{f.name: getattr(self, f.name) for f in fields(self)})
        clone.stop_strs = list(self.stop_strs)
        if clone.seed is not None:
            clone.seed = clone.seed + offset
        clone.n = 1
        return clone


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{name} has the wrong type: {type(value).__name__}")
