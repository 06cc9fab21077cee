"""GGUF files (llama.cpp): the weights, as dequantized HF-named tensors.

The HF config from the metadata is read by radixserve.configs.gguf_config.

Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0,
the K-quants, ...) to float32 and renamed to HF's names, so models load them
exactly like safetensors. llama.cpp stores llama-arch Q and K rows permuted (GPT-J
pair order); that permutation is undone here so HF's half-split RoPE applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf.quants import dequantize
from transformers import PretrainedConfig

from radixserve.configs.gguf_config import gguf_field, open_gguf

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


def count_gguf_tensors(path: str) -> int:
    return len(open_gguf(path).tensors)


def iterate_gguf(path: str, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file."""
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
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
