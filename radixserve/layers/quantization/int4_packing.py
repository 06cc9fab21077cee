"""The on-disk int4 layouts of AutoAWQ (GEMM version) and GPTQ, and the one layout our
kernels read.

AutoAWQ: qweight [K, N / 8] int32 and qzeros [K / G, N / 8] pack eight output columns
per word in the interleaved order AWQ_ORDER (nibble i holds column AWQ_ORDER[i] of the
eight); scales [K / G, N]. w[k, n] = (q - z) * s of group k // G.
GPTQ: qweight [K / 8, N] packs eight input rows per word in order (row 8i + j in nibble
j); qzeros [groups, N / 8] packs output columns in order and, in the original
("gptq", v1) format, stores zero - 1; scales [groups, N]; g_idx [K] is the group of each
input row (a permutation of groups under act-order / desc_act).
Ours (for the dequant kernels): qweight [K / 8, N] as GPTQ's, zeros and scales
[groups, N] as floats, g_idx [K].
"""

from __future__ import annotations

import torch

PACK = 8  # int4 values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of a group of eight sits in nibble AWQ_NIBBLE_OF_COLUMN[j].
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(j) for j in range(PACK))
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C / 8] int32 -> [R, C] int32 values 0..15; `order`: the nibble of each of a
    word's eight columns (None: nibble j is column j)."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [R, C/8, 8]
    if order is not None:
        nibbles = nibbles[..., list(order)]
    return nibbles.reshape(packed.shape[0], -1)


def pack_cols(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of unpack_cols: [R, C] values 0..15 -> [R, C / 8] int32."""
    r, c = values.shape
    cols = values.to(torch.int32).reshape(r, c // PACK, PACK)
    if order is not None:
        # Nibble i holds the column whose nibble is i.
        cols = cols[..., [order.index(i) for i in range(PACK)]]
    words = (cols << _SHIFTS.to(values.device)).sum(-1, dtype=torch.int64)
    return _as_int32(words)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R / 8, C] int32 (row 8i + j in nibble j) -> [R, C] values 0..15."""
    nibbles = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, PACK, 1)) & 0xF
    return nibbles.reshape(-1, packed.shape[1])


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_rows: [R, C] values 0..15 -> [R / 8, C] int32."""
    r, c = values.shape
    rows = values.to(torch.int64).reshape(r // PACK, PACK, c)
    words = (rows << _SHIFTS.to(values.device).view(1, PACK, 1).to(torch.int64)).sum(1)
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def awq_to_ours(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's tensors -> (qweight [K/8, N], zeros, scales, g_idx) in our layout."""
    k = qweight.shape[0]
    group = k // scales.shape[0]
    q = unpack_cols(qweight, AWQ_NIBBLE_OF_COLUMN)
    zeros = unpack_cols(qzeros, AWQ_NIBBLE_OF_COLUMN).to(scales.dtype)
    g_idx = torch.arange(k, dtype=torch.int32, device=qweight.device) // group
    return pack_rows(q), zeros, scales, g_idx


def gptq_to_ours(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, zeros_minus_one: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's tensors -> ours; zeros_minus_one for the v1 ("gptq") checkpoint format."""
    zeros = unpack_cols(qzeros) + (1 if zeros_minus_one else 0)
    return qweight, zeros.to(scales.dtype), scales, g_idx.to(torch.int32)


def dequantize_reference(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                         g_idx: torch.Tensor) -> torch.Tensor:
    """Our layout -> the float32 weight [K, N] (input-major): (q - z) * s by group."""
    q = unpack_rows(qweight).float()
    g = g_idx.long()
    return (q - zeros.float()[g]) * scales.float()[g]


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                          scales: torch.Tensor, g_idx: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized weight [K, N] (+ bias), in float32, cast to x's dtype."""
    out = x.float() @ dequantize_reference(qweight, zeros, scales, g_idx)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
