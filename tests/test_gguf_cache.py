"""What a GGUF start derives (the HF config, the converted tokenizer) is cached between
starts, and the cached copies behave exactly as freshly converted ones; a damaged or
unwritable cache only costs a conversion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from radixserve.configs import gguf_config
from radixserve.configs.gguf_config import derived_cache_dir, resolve_gguf_file
from radixserve.configs.load_config import LoadConfig
from radixserve.model_loader.tokenizer import get_tokenizer
from radixserve.server_args import default_model_path

TEXTS = ["The capital of France is", "  spaces\tand\nnewlines  ", "émigré 東京 🙂",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2\n"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def gguf_file() -> str:
    return resolve_gguf_file(default_model_path())


@pytest.fixture(scope="module")
def fresh(gguf_file: str):
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                         gguf_file=os.path.basename(gguf_file))


def _load(gguf_file: str):
    return get_tokenizer(LoadConfig(model_path=gguf_file))


def _assert_same_tokenizer(got, want) -> None:
    assert got.get_vocab() == want.get_vocab()
    assert got.all_special_tokens == want.all_special_tokens
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id) == \
        (want.bos_token_id, want.eos_token_id, want.pad_token_id)
    for text in TEXTS:
        ids = want(text)["input_ids"]
        assert got(text)["input_ids"] == ids
        assert got.decode(ids) == want.decode(ids)
        assert got.decode(ids, skip_special_tokens=True) == \
            want.decode(ids, skip_special_tokens=True)
    assert got.chat_template == want.chat_template
    assert got.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_cached_tokenizer_and_config_equal_the_converted_ones(
        gguf_file: str, fresh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", str(tmp_path))
    first = _load(gguf_file)  # converts and writes the cache
    cached = derived_cache_dir(gguf_file, "tokenizer")
    assert cached is not None and (cached / "tokenizer.json").is_file()
    second = _load(gguf_file)  # reads it
    _assert_same_tokenizer(first, fresh)
    _assert_same_tokenizer(second, fresh)

    want = gguf_config._config_from_metadata(gguf_file).to_dict()
    for _ in range(2):  # written, then read back
        got = gguf_config.load_gguf_config(gguf_file).to_dict()
        assert {k: v for k, v in got.items() if k != "transformers_version"} == \
            {k: v for k, v in want.items() if k != "transformers_version"}
    assert (derived_cache_dir(gguf_file, "config") / "config.json").is_file()


def test_a_damaged_copy_is_converted_again(gguf_file: str, fresh, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", str(tmp_path))
    _load(gguf_file)
    cached = derived_cache_dir(gguf_file, "tokenizer")
    (cached / "tokenizer.json").write_text("{not json")
    _assert_same_tokenizer(_load(gguf_file), fresh)  # reconverted, and the copy replaced
    _assert_same_tokenizer(AutoTokenizer.from_pretrained(str(cached)), fresh)


def test_off_and_unwritable_caches_still_load(gguf_file: str, fresh, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", "off")
    assert derived_cache_dir(gguf_file, "tokenizer") is None
    _assert_same_tokenizer(_load(gguf_file), fresh)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", str(blocked))  # mkdir below a file fails
    _assert_same_tokenizer(_load(gguf_file), fresh)
    assert blocked.is_file()


def test_the_key_follows_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", str(tmp_path))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    before = derived_cache_dir(str(f), "tokenizer")
    f.write_bytes(b"ab")  # an edited file gets a new key
    assert derived_cache_dir(str(f), "tokenizer") != before
    assert derived_cache_dir(str(f), "tokenizer").parent == \
        derived_cache_dir(str(f), "config").parent
