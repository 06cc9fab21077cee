"""Per-request sampling parameters, with the same names and defaults as SGLang."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from radixserve.core import stop_regex

_GREEDY_EPS = 1e-6
_DERIVED = {"stop_strs", "stop_str_max_len", "stop_regex_strs", "stop_regex_max_len"}


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
    # Python regular expressions; generation stops once the output text matches one.
    stop_regex: str | list[str] | None = None
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
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text
    # SGLang's name for seed; from_dict folds it into seed.
    sampling_seed: int | None = None
    # Accepted for SGLang clients; radixserve streams every token and runs no custom
    # logit processors, so neither changes the output.
    stream_interval: int | None = None
    custom_params: dict[str, Any] | None = None
    # Token id -> bias added to its logit before sampling (OpenAI's and SGLang's name;
    # keys may be ints or decimal strings, as JSON gives them). normalize() makes the
    # keys ints.
    logit_bias: dict[Any, float] | None = None
    # Filled by normalize(): the stop strings as a list, their longest length in chars;
    # the stop regexes as a list, and how many tokens of output tail they are run on.
    stop_strs: list[str] = field(default_factory=list)
    stop_str_max_len: int = 0
    stop_regex_strs: list[str] = field(default_factory=list)
    stop_regex_max_len: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        """Build from a JSON-like dict; unknown keys are an error naming the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - _DERIVED
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {unknown}")
        params = cls(**{k: v for k, v in d.items() if v is not None or k in ("stop", "seed")})
        if params.seed is None and params.sampling_seed is not None:
            params.seed = params.sampling_seed
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
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)
        grammars = [g for g in (self.json_schema, self.regex, self.ebnf, self.structural_tag)
                    if g is not None]
        if len(grammars) > 1:
            raise ValueError("only one of json_schema, regex, ebnf, structural_tag may be set")
        self._verify_sglang_extras()

    def _verify_sglang_extras(self) -> None:
        stop_regex.compile_all(self.stop_regex)
        if self.sampling_seed is not None:
            _check_type("sampling_seed", self.sampling_seed, int)
        if self.stream_interval is not None:
            _check_type("stream_interval", self.stream_interval, int)
            if self.stream_interval < 1:
                raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError("custom_params must be an object")

    def normalize(self) -> None:
        """Derive the fields the scheduler reads; call after verify()."""
        if self.stop is None:
            self.stop_strs = []
        elif isinstance(self.stop, str):
            self.stop_strs = [self.stop] if self.stop else []
        else:
            self.stop_strs = [s for s in self.stop if s]
        self.stop_str_max_len = max((len(s) for s in self.stop_strs), default=0)
        self.stop_regex_strs = stop_regex.as_list(self.stop_regex)
        self.stop_regex_max_len = stop_regex.window(self.stop_regex_strs)
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
        if self.temperature < _GREEDY_EPS:
            # Greedy is top-1 at temperature 1: one code path in the sampler.
            self.temperature = 1.0
            self.top_k = 1

    def copy_with_seed_offset(self, offset: int) -> "SamplingParams":
        """A copy for the offset-th of n parallel samples, so that n samples differ."""
        clone = SamplingParams(**{f.name: getattr(self, f.name) for f in fields(self)})
        clone.stop_strs = list(self.stop_strs)
        clone.stop_regex_strs = list(self.stop_regex_strs)
        if self.logit_bias is not None:
            clone.logit_bias = dict(self.logit_bias)
        if clone.seed is not None:
            clone.seed = clone.seed + offset
        clone.n = 1
        return clone


# OpenAI's range: -100 bans a token, 100 forces it.
LOGIT_BIAS_RANGE = 100.0


def _check_logit_bias(bias: Any) -> None:
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must be an object mapping token ids to biases")
    for key, value in bias.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (
                isinstance(key, str) and key.isascii() and key.isdigit())):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or abs(value) > LOGIT_BIAS_RANGE:
            raise ValueError(f"logit_bias values must be numbers in "
                             f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], got {value!r} "
                             f"for token {key}")


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{name} has the wrong type: {type(value).__name__}")
