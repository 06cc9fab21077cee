"""Detokenizer unit tests with the real SmolLM2 byte-level BPE tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from radixserve.managers.detokenizer_manager import Detokenizer
from radixserve.managers.io_struct import BatchTokenIDOut
from radixserve.model_loader.tokenizer import get_tokenizer
from radixserve.server_args import ServerArgs


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return get_tokenizer(ServerArgs().load_config())


def _out(rids: list[str], ids: list[list[int]], finished: list[dict | None],
         no_stop_trim: bool = False) -> BatchTokenIDOut:
    n = len(rids)
    return BatchTokenIDOut(
        rids=rids, new_output_ids=ids, finished_reasons=finished,
        prompt_tokens=[1] * n, completion_tokens=[len(i) for i in ids], cached_tokens=[0] * n,
        skip_special_tokens=[True] * n, spaces_between_special_tokens=[True] * n,
        no_stop_trim=[no_stop_trim] * n, output_token_logprobs=[None] * n,
        output_top_logprobs=[None] * n, input_token_logprobs=[None] * n,
        input_top_logprobs=[None] * n)


def _stream(detok: Detokenizer, ids: list[int], finish: dict, rid: str = "r",
            no_stop_trim: bool = False) -> list[str]:
    deltas = []
    for i, tok in enumerate(ids):
        last = i == len(ids) - 1
        out = detok.handle(_out([rid], [[tok]], [finish if last else None], no_stop_trim))
        deltas.append(out.text_deltas[0])
    return deltas


def test_multibyte_split_across_tokens(tokenizer: Any) -> None:
    text = "héllo 日本語 🎉 ok ünïcödé ✓"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # really split
    detok = Detokenizer(tokenizer)
    deltas = _stream(detok, ids, {"type": "length", "length": len(ids)})
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.num_active() == 0


def test_stop_string_spanning_tokens_is_trimmed_and_never_sent(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world, the end. More text after")
    stop = "the end"
    upto = next(i for i in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:i]))
    detok = Detokenizer(tokenizer)
    detok.register("r", [stop, "never"])
    deltas = _stream(detok, ids[:upto], {"type": "stop", "matched": stop})
    assert "".join(deltas) == "Hello world, "
    assert all("the" not in d for d in deltas)
    assert detok.num_active() == 0


def test_no_stop_trim_keeps_stop_string(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four")
    upto = next(i for i in range(1, len(ids) + 1) if "three" in tokenizer.decode(ids[:i]))
    detok = Detokenizer(tokenizer)
    detok.register("r", ["three"])
    deltas = _stream(detok, ids[:upto], {"type": "stop", "matched": "three"}, no_stop_trim=True)
    assert "".join(deltas) == tokenizer.decode(ids[:upto])


def test_partial_stop_prefix_is_held_then_released(tokenizer: Any) -> None:
    head, tail = tokenizer.encode("alpha beta"), tokenizer.encode(" gamma")
    detok = Detokenizer(tokenizer)
    detok.register("r", [" beta delta"])
    sent = "".join(detok.handle(_out(["r"], [[t]], [None])).text_deltas[0] for t in head)
    assert sent == "alpha"  # " beta" may still become the stop string
    final = detok.handle(_out(["r"], [tail], [{"type": "length", "length": 3}]))
    assert sent + final.text_deltas[0] == "alpha beta gamma"


def test_stop_token_id_is_not_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("apples and pears")
    detok = Detokenizer(tokenizer)
    deltas = _stream(detok, ids, {"type": "stop", "matched": ids[-1]})
    assert "".join(deltas) == tokenizer.decode(ids[:-1])


def test_interleaved_requests_keep_separate_state(tokenizer: Any) -> None:
    a, b = tokenizer.encode("日本語のテキスト"), tokenizer.encode("plain words here")
    detok = Detokenizer(tokenizer)
    got = {"a": "", "b": ""}
    for i in range(max(len(a), len(b))):
        rids, ids, fin = [], [], []
        for rid, seq in (("a", a), ("b", b)):
            if i < len(seq):
                rids.append(rid)
                ids.append([seq[i]])
                fin.append({"type": "length", "length": len(seq)} if i == len(seq) - 1 else None)
        out = detok.handle(_out(rids, ids, fin))
        for rid, delta in zip(out.rids, out.text_deltas):
            got[rid] += delta
    assert got == {"a": tokenizer.decode(a), "b": tokenizer.decode(b)}
    assert detok.num_active() == 0
