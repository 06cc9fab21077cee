"""GGUF files (llama.cpp): HF config from the metadata, dequantized HF-named tensors.

Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0,
the K-quants, ...) to float32 and renamed to HF's names, so models load them
exactly like safetensors. llama.cpp stores llama-arch Q and K rows permuted (GPT-J
pair order); that permutation is undone here so HF's half-split RoPE applies.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from transformers import AutoConfig, PretrainedConfig

# GGUF `general.architecture` -> (HF model_type, HF architecture name).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# Archs whose converter permuted Q/K rows for llama.cpp's interleaved RoPE.
_PERMUTED_ARCHS = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


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


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
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
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(_ARCHS))}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1 rope scaling as a tensor of per-frequency factors.
        raise ValueError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; "
                         f"use the HF safetensors checkpoint")
    model_type, architecture = _ARCHS[arch]
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        architectures=[architecture],
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0))},
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return AutoConfig.for_model(model_type, **kwargs)


def count_gguf_tensors(path: str) -> int:
    return len(open_gguf(path).tensors)


def iterate_gguf(path: str, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file."""
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims inner-first
        try:
            array = dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name!r} "
                             f"({t.tensor_type.name}, shape {shape}): {e}") from e
        if arch in _PERMUTED_ARCHS and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (config.num_attention_heads if "q_proj" in name
                     else config.num_key_value_heads)
            array = unpermute_qk(array, heads)
        if not array.flags.writeable:  # F32 tensors are views of the read-only memmap
            array = array.copy()
        yield name, torch.from_numpy(array)


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF counterpart")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's conversion permutation.

    Per head, the converter reorders rows from [first half; second half] (HF's rotate
    half) to interleaved pairs (GPT-J); this puts each head's rows back in halves.
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
