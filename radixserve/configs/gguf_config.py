"""GGUF files (llama.cpp): the HF config equivalent to their metadata.

Reading a model's configuration sits below the model loader (configs/ is a low layer),
so the metadata reader lives here; model_loader/gguf_loader.py dequantizes the tensors
and shares the parsed file through `open_gguf`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from gguf import GGUFReader, GGUFValueType
from transformers import AutoConfig, PretrainedConfig

# GGUF `general.architecture` -> (HF model_type, HF architecture name).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def resolve_gguf_file(model_path: str) -> str:
    """A .gguf path as given, or the single .gguf file inside a folder."""
    if os.path.isfile(model_path):
        return model_path
    if os.path.isdir(model_path):
        found = sorted(n for n in os.listdir(model_path) if n.endswith(".gguf"))
        if len(found) == 1:
            return os.path.join(model_path, found[0])
        raise ValueError(f"{model_path}: expected exactly one .gguf file, found {found}")
    raise ValueError(f"GGUF model {model_path} does not exist")


def open_gguf(path: str) -> GGUFReader:
    """The parsed file, shared by the config and weight readers.

    Parsing the metadata (tens of thousands of vocabulary strings) takes seconds, so the
    last readers are kept, keyed by the file's identity so an edited file is re-read.
    """
    st = os.stat(path)
    return _open_gguf(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a bad or short file
        raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(value)
    return value


def load_gguf_config(path: str) -> PretrainedConfig:
    """An HF config equivalent to the GGUF's `<arch>.*` metadata."""
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(_ARCHS))}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1 rope scaling as a tensor of per-frequency factors.
        raise ValueError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; "
                         f"use the HF safetensors checkpoint")
    model_type, architecture = _ARCHS[arch]
    heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    hidden = int(gguf_field(reader, f"{arch}.embedding_length"))
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        architectures=[architecture],
        num_hidden_layers=int(gguf_field(reader, f"{arch}.block_count")),
        hidden_size=hidden,
        intermediate_size=int(gguf_field(reader, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(
            gguf_field(reader, f"{arch}.rope.freq_base", 10000.0))},
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return AutoConfig.for_model(model_type, **kwargs)
