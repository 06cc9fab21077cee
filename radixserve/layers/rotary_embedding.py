"""Rotary position embedding: default RoPE, Llama 3's frequency scaling, YaRN, and the
multimodal M-RoPE of Qwen2.5-VL / Qwen3-VL (three position axes: time, height, width).

One cos/sin table of shape [max_position, rotary_dim] (cos in the first half, sin in
the second, float32) is built at init; each forward gathers the rows of its positions.
The neox style (rotate the two halves of each head) is what HF Llama, Mistral and Qwen
use; the GPT-J style (rotate interleaved pairs) is kept for checkpoints that need it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.layers.kv_write import KVWrite
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.lazy_kernels import triton_kernel


def rope_params(config: PretrainedConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config form.

    transformers >= 5 keeps both in `rope_parameters`; older configs have a top-level
    `rope_theta` and a `rope_scaling` dict whose type key is `type` or `rope_type`.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    mrope = _mrope_scaling(params) or _mrope_scaling(getattr(config, "rope_scaling", None))
    if mrope is not None:
        return float(theta), mrope
    scaling = params if params.get("rope_type", "default") != "default" else None
    if scaling is None:
        scaling = getattr(config, "rope_scaling", None)
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    return float(theta), scaling


def _mrope_scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """The M-RoPE entry of a VL config's rope parameters (its `mrope_section` marks it;
    the config's own type key says "default" or "mrope" depending on its age)."""
    if not params or not params.get("mrope_section"):
        return None
    return {"rope_type": "mrope", "mrope_section": [int(s) for s in params["mrope_section"]],
            "mrope_interleaved": bool(params.get("mrope_interleaved", False))}


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.is_neox_style = is_neox_style
        cache = self._compute_cos_sin_cache()
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _compute_inv_freq(self) -> torch.Tensor:
        # Same expression as HF so float32 rounding matches exactly.
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (self.base ** exponent)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq = self._compute_inv_freq()
        t = torch.arange(self.max_position, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query: [T, H * D], key: [T, Hkv * D] (rows may be strided views); returns the
        rotated pair, which on CUDA are the inputs rotated in place."""
        query, key, _ = self.forward_and_store(positions, query, key)
        return query, key

    def forward_and_store(self, positions: torch.Tensor, query: torch.Tensor,
                          key: torch.Tensor, value: torch.Tensor | None = None,
                          kv_write: KVWrite | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """`forward`, and with kv_write (and value), the rotated key and the value written
        to the KV pool by the same kernel where it can. Returns (query, key, whether k/v
        were stored): when False, the attention backend must store them."""
        table, positions = self._table_and_rows(positions)
        if query.is_cuda:
            kernel = triton_kernel("radixserve.layers.triton_kernels", "apply_rotary_")
            if kernel is not None:
                store = kv_write is not None and self.rotary_dim == self.head_size
                kernel(query, key, positions, table, self.is_neox_style,
                       self.head_size, kv_write=kv_write if store else None,
                       v=value if store else None)
                return query, key, store
        cos, sin = table[positions].chunk(2, dim=-1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin), False

    def forward_with_qk_norm(self, positions: torch.Tensor, query: torch.Tensor,
                             key: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                             value: torch.Tensor | None = None,
                             kv_write: KVWrite | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """RMSNorm each head of q and k, then rotate (Qwen3). On CUDA one fused kernel
        does both in place, and the KV store too given kv_write: four launches per layer
        become one. Returns (query, key, whether k/v were stored), as forward_and_store."""
        fusable = (self.rotary_dim == self.head_size and self.head_size & (self.head_size - 1) == 0
                   and q_norm.variance_epsilon == k_norm.variance_epsilon)
        if query.is_cuda and fusable:
            kernel = triton_kernel("radixserve.layers.triton_kernels.qk_norm_rotary",
                                   "qk_norm_rotary_")
            if kernel is not None:
                table, rows = self._table_and_rows(positions)
                kernel(query, key, rows, table, q_norm.weight, k_norm.weight,
                       q_norm.variance_epsilon, self.is_neox_style, kv_write=kv_write,
                       v=value if kv_write is not None else None)
                return query, key, kv_write is not None
        query = q_norm(query.reshape(-1, self.head_size)).view(query.shape)
        key = k_norm(key.reshape(-1, self.head_size)).view(key.shape)
        return self.forward_and_store(positions, query, key, value, kv_write)

    def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        table, positions = self._table_and_rows(positions)
        cos, sin = table[positions].chunk(2, dim=-1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _table_and_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin table the kernels read and each token's row in it."""
        return self.cos_sin_cache, positions

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.view(shape[0], -1, self.head_size)
        rot, rest = x[..., :self.rotary_dim].float(), x[..., self.rotary_dim:]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            out = torch.cat((o1, o2), dim=-1)
        else:
            out = torch.stack((o1, o2), dim=-1).flatten(-2)
        return torch.cat((out.to(dtype), rest), dim=-1).reshape(shape)


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1's long-context scaling: low frequencies divided by `factor`, high ones
    kept, and a smooth blend between the two wavelength bands."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool, factor: float, low_freq_factor: float,
                 high_freq_factor: float, original_max_position: int) -> None:
        self.factor = factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.original_max_position = original_max_position
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _compute_inv_freq(self) -> torch.Tensor:
        inv_freq = super()._compute_inv_freq()
        low_freq_wavelen = self.original_max_position / self.low_freq_factor
        high_freq_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = ((self.original_max_position / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)


class YaRNScalingRotaryEmbedding(RotaryEmbedding):
    """YaRN (arXiv 2309.00071), as DeepSeek-V2/V3 and long-context Qwen configs use it:
    frequencies below the `beta_slow` band are divided by `factor`, those above
    `beta_fast` kept, a linear ramp between; cos and sin are scaled by the attention
    factor (from `mscale` / `mscale_all_dim` when the config gives them)."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool, scaling: dict[str, Any]) -> None:
        self.factor = float(scaling["factor"])
        self.original_max_position = int(scaling["original_max_position_embeddings"])
        self.beta_fast = float(scaling.get("beta_fast") or 32)
        self.beta_slow = float(scaling.get("beta_slow") or 1)
        self.truncate = bool(scaling.get("truncate", True))
        self.attention_factor = yarn_attention_factor(scaling)
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)

    def _correction_dim(self, num_rotations: float) -> float:
        """The rotary dimension whose wavelength fits `num_rotations` times in the
        original context."""
        return (self.rotary_dim * math.log(self.original_max_position
                                           / (num_rotations * 2 * math.pi))
                / (2 * math.log(self.base)))

    def _compute_inv_freq(self) -> torch.Tensor:
        # Same expressions as HF so float32 rounding matches exactly.
        pos_freqs = self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float()
                                  / self.rotary_dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (self.factor * pos_freqs)
        low = self._correction_dim(self.beta_fast)
        high = self._correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.rotary_dim - 1)
        if low == high:
            high += 0.001  # a single-dimension ramp would divide by zero
        ramp = ((torch.arange(self.rotary_dim // 2, dtype=torch.float32) - low)
                / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 where the original frequency is kept (extrapolated)
        return interpolation * (1 - keep) + extrapolation * keep

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return super()._compute_cos_sin_cache() * self.attention_factor


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL and later): each frequency of the rotary half-dimension takes its
    angle from one of three position axes (t, h, w). Positions are [3, T], or [T] when
    every axis is equal (text tokens, decode steps), which is plain RoPE: the CUDA-graph
    decode path is unchanged. `mrope_section` counts the frequencies per axis; in the
    plain layout they are contiguous runs (t first), in Qwen3-VL's interleaved layout
    frequency j belongs to h when j % 3 == 1 and to w when j % 3 == 2, within each
    axis's 3 * section, and to t otherwise.

    For [3, T] positions a per-token table of the mixed cos/sin rows is built and the
    same kernels read it with positions 0..T-1."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool, mrope_section: list[int],
                 interleaved: bool = False) -> None:
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style)
        half = rotary_dim // 2
        if len(mrope_section) != 3 or sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} must be three counts summing to "
                             f"rotary_dim / 2 = {half}")
        self.mrope_section = list(mrope_section)
        self.interleaved = interleaved
        self.register_buffer("freq_axis", mrope_freq_axis(mrope_section, interleaved),
                             persistent=False)

    def _table_and_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return self.cos_sin_cache, positions
        half = self.rotary_dim // 2
        rows = self.cos_sin_cache[positions]  # [3, T, rotary_dim]
        axis = self.freq_axis.view(1, 1, half).expand(1, rows.shape[1], half)
        cos = rows[..., :half].gather(0, axis)
        sin = rows[..., half:].gather(0, axis)
        table = torch.cat((cos, sin), dim=-1)[0].contiguous()
        return table, torch.arange(table.shape[0], device=positions.device)


def mrope_freq_axis(mrope_section: list[int], interleaved: bool) -> torch.Tensor:
    """For each rotary frequency, the position axis (0 = t, 1 = h, 2 = w) it reads."""
    half = sum(mrope_section)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    axis = torch.zeros(half, dtype=torch.int64)
    for a in (1, 2):
        axis[a:3 * mrope_section[a]:3] = a
    return axis


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """The factor on cos/sin: given, or from mscale / mscale_all_dim (DeepSeek)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float,
             rope_scaling: dict[str, Any] | None = None,
             is_neox_style: bool = True) -> RotaryEmbedding:
    if rope_scaling is None:
        return RotaryEmbedding(head_size, rotary_dim, max_position, base, is_neox_style)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type == "mrope":
        return MRotaryEmbedding(head_size, rotary_dim, max_position, base, is_neox_style,
                                rope_scaling["mrope_section"],
                                bool(rope_scaling.get("mrope_interleaved", False)))
    if rope_type == "llama3":
        return Llama3RotaryEmbedding(
            head_size, rotary_dim, max_position, base, is_neox_style,
            factor=float(rope_scaling["factor"]),
            low_freq_factor=float(rope_scaling["low_freq_factor"]),
            high_freq_factor=float(rope_scaling["high_freq_factor"]),
            original_max_position=int(rope_scaling["original_max_position_embeddings"]))
    if rope_type == "yarn":
        return YaRNScalingRotaryEmbedding(head_size, rotary_dim, max_position, base,
                                          is_neox_style, rope_scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, "
                     f"llama3, yarn, mrope)")

