"""get_tokenizer: the HF tokenizer of an HF folder or a GGUF file, and its chat template.

The template comes from tokenizer_config.json or the GGUF's `tokenizer.chat_template`
(transformers reads both); `--chat-template` replaces it with a file's contents or,
when no such file exists, with the given string itself.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from radixserve.configs.gguf_config import cached_derivation, resolve_gguf_file
from radixserve.configs.load_config import LoadConfig


def get_tokenizer(load: LoadConfig) -> PreTrainedTokenizerBase:
    path = str(load.tokenizer_path or load.model_path)
    if path.endswith(".gguf") or (load.is_gguf and load.tokenizer_path is None):
        gguf_file = resolve_gguf_file(path)
        # Converting the GGUF vocabulary to a fast tokenizer is slow; the converted one
        # is kept as an HF tokenizer folder (configs/gguf_config.py derived_cache_dir).
        tokenizer = cached_derivation(
            gguf_file, "tokenizer", load=lambda d: AutoTokenizer.from_pretrained(str(d)),
            make=lambda: AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                                       gguf_file=os.path.basename(gguf_file)),
            save=lambda tok, d: tok.save_pretrained(str(d)))
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=load.trust_remote_code)
    if load.chat_template:
        tokenizer.chat_template = load_chat_template(load.chat_template)
    return tokenizer


def load_chat_template(template: str) -> str:
    """A Jinja template from a file path, or the argument itself when it is no file."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    if "{" not in template:
        # Neither a file nor Jinja: most likely a mistyped path.
        raise ValueError(f"chat template {template!r} is neither a file nor a Jinja template")
    return template
