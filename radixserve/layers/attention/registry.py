"""Attention backends by name: `--attention-backend` picks one, and the model's
attention kind (MHA/GQA, or DeepSeek's MLA) picks its variant. Each backend's module
is imported only when it is chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixserve.layers.attention.base import AttentionBackend


@dataclass(frozen=True)
class AttentionSpec:
    """What a backend is built from: this rank's heads and the model's shapes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    device: torch.device
    max_context_len: int
    # MLA only (None for MHA/GQA models).
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None


def _torch_native(spec: AttentionSpec) -> AttentionBackend:
    if spec.is_mla:
        from radixserve.layers.attention.torch_native_mla import TorchNativeMLABackend

        return TorchNativeMLABackend()
    from radixserve.layers.attention.torch_native import TorchNativeAttnBackend

    return TorchNativeAttnBackend()


def _triton(spec: AttentionSpec) -> AttentionBackend:
    if spec.is_mla:
        from radixserve.layers.attention.triton_mla import TritonMLABackend

        return TritonMLABackend(spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim,
                                spec.device, spec.max_context_len)
    from radixserve.layers.attention.triton import TritonAttnBackend

    return TritonAttnBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.device,
                             spec.max_context_len)


ATTENTION_BACKENDS: dict[str, Callable[[AttentionSpec], AttentionBackend]] = {
    "torch_native": _torch_native,  # the reference; runs on CPU
    "triton": _triton,  # the GPU default
}


def create_attention_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    factory = ATTENTION_BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown attention backend {name!r} "
                         f"({', '.join(ATTENTION_BACKENDS)})")
    return factory(spec)
