"""stop_regex and SGLang's other sampling extras in SamplingParams (no model needed):
how much output tail a pattern needs, which patterns are refused and with what field,
and that the scheduler's tail check finds a match exactly when a search of the whole
output does."""

from __future__ import annotations

import random
import re

import pytest

from radixserve.core import stop_regex
from radixserve.core.sampling_params import SamplingParams


def _params(**kw: object) -> SamplingParams:
    p = SamplingParams.from_dict(dict(kw))
    p.verify()
    p.normalize()
    return p


def test_window_bounds_the_longest_match() -> None:
    assert stop_regex.window(["abc"]) == 3
    assert stop_regex.window(["a{2,5}", "x"]) == 5
    assert stop_regex.window([r"\n+"]) == stop_regex.MAX_WINDOW  # unbounded: capped
    assert stop_regex.window([]) == 0


@pytest.mark.parametrize("value,message", [
    ("(", "not a valid regular expression"),
    (5, "string or a list of strings"),
    (["ok", 3], "string or a list of strings"),
    (["a"] * (stop_regex.MAX_PATTERNS + 1), "at most"),
    ("a" * (stop_regex.MAX_PATTERN_CHARS + 1), "at most"),
])
def test_bad_patterns_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        _params(stop_regex=value)
    assert str(err.value).startswith("stop_regex")


def test_normalized_fields_and_sglang_aliases() -> None:
    p = _params(stop_regex=["", r"\d\.", "end"], sampling_seed=11, stream_interval=4,
                custom_params={"k": 1}, structural_tag='{"structures": []}')
    assert p.stop_regex_strs == [r"\d\.", "end"] and p.stop_regex_max_len == 3
    assert p.seed == 11
    clone = p.copy_with_seed_offset(2)
    assert clone.stop_regex_strs == p.stop_regex_strs and clone.seed == 13
    assert _params(seed=1, sampling_seed=9).seed == 1  # seed wins when both are given
    with pytest.raises(ValueError, match="only one of"):
        _params(regex="a", structural_tag="{}")
    with pytest.raises(ValueError, match="stream_interval"):
        _params(stream_interval=0)
    with pytest.raises(ValueError, match="custom_params"):
        _params(custom_params=[1])


def test_tail_search_agrees_with_whole_text_search() -> None:
    """What the scheduler does each step (search the last window+1 "tokens") stops at
    the same step as searching the whole output would, for bounded patterns."""
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", ".", " ", "ba", "\n", "b."]
    patterns = [r"ab\.", r"b{2}", r"a\s", "(ab|ba)a"]
    for _ in range(300):
        tokens = [rng.choice(alphabet) for _ in range(30)]
        p = _params(stop_regex=patterns)
        tail_stop = whole_stop = None
        for n in range(1, len(tokens) + 1):
            tail = "".join(tokens[max(0, n - p.stop_regex_max_len - 1):n])
            if tail_stop is None and stop_regex.first_match(p.stop_regex_strs, tail):
                tail_stop = n
            if whole_stop is None and any(re.search(q, "".join(tokens[:n])) for q in patterns):
                whole_stop = n
        assert tail_stop == whole_stop, tokens


def test_a_pattern_that_backtracks_forever_is_cut_off() -> None:
    """Python's re would take minutes on this (every split of the a's is tried); the
    match gives up after MATCH_TIMEOUT_S, so the scheduler's step is not held."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        stop_regex.first_match([r"(a|aa)+$"], "a" * 60 + "!")
    assert time.perf_counter() - t0 < 2.0
