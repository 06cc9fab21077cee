"""Greedy tokens under a grammar's packed bitmask, reading the logits in place.

The result equals the logits-processor path's (float32 copy, xgrammar's
apply_token_bitmask_inplace, argmax) exactly: disallowed tokens count as -inf, ties go
to the first index, NaN beats everything (torch.argmax's rules), and tokens past the
bitmask's 32 * words stay unmasked. Only the logits and the bitmask are read: at B=64
and V=151936 that is 39 MB of float32 logits instead of the ~190 MB the copy, the mask
and the argmax move between them.

Two stages. A (row, tile) program reduces its tile of 32 * TILE_WORDS tokens to one
int64 whose high half orders the values and whose low half prefers the lower index, so
that a plain max picks the first index of the max value; one program per row then takes
the max over its tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait

# 4096 tokens a program: 38 tiles a row at V=151936, 2,432 programs at B=64.
_TILE_WORDS = 128
_INDEX_BITS = tl.constexpr(0x7FFFFFFF)
# Below every packed (key, index): key(-inf) is -0x7F800001.
_NO_TILE = tl.constexpr(-(0x7FFFFFFF << 32))


@triton.jit
def _tile_max_kernel(Logits, Bitmask, HasMask, Partial, stride_l, stride_b, vocab, words,
                     num_tiles, HAS_ROWS: tl.constexpr, TILE_WORDS: tl.constexpr,
                     USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    word = tile * TILE_WORDS + tl.arange(0, TILE_WORDS)
    bit = tl.arange(0, 32)
    token = word[:, None] * 32 + bit[None, :]
    pdl_wait(USE_PDL)
    # Past the vocabulary a lane is -inf: it has a higher index than every real token of
    # its tile, so it never wins, even over a row of -inf.
    x = tl.load(Logits + row * stride_l + token, mask=token < vocab,
                other=float("-inf")).to(tl.float32)
    if HAS_ROWS:
        words = words * tl.load(HasMask + row).to(tl.int32)  # HasMask is 0 or 1
    # A row without a grammar, and the words past the bitmask, read as all-allowed.
    mask_words = tl.load(Bitmask + row * stride_b + word, mask=word < words, other=-1)
    pdl_launch_dependents(USE_PDL)
    allowed = ((mask_words[:, None] >> bit[None, :]) & 1) != 0
    x = tl.where(allowed, x, float("-inf"))
    # An int32 key in the order of the values: -0.0 ties +0.0 and every NaN beats +inf.
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    packed = (key.to(tl.int64) << 32) | (token ^ _INDEX_BITS).to(tl.int64)
    tl.store(Partial + row * num_tiles + tile, tl.max(tl.max(packed, axis=1), axis=0))


@triton.jit
def _row_max_kernel(Partial, Out, num_tiles, BLOCK_TILES: tl.constexpr,
                    USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.arange(0, BLOCK_TILES)
    pdl_wait(USE_PDL)
    packed = tl.load(Partial + row * num_tiles + tiles, mask=tiles < num_tiles,
                     other=_NO_TILE)
    pdl_launch_dependents(USE_PDL)
    best = tl.max(packed, axis=0)
    tl.store(Out + row, (best & _INDEX_BITS) ^ _INDEX_BITS)


def masked_argmax(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of `logits` ([B, V] float, last dim contiguous), the argmax over the tokens
    whose bit is set in `bitmask` ([B, W] int32, bit j of word w is token 32 * w + j).
    Only the rows listed in `rows` (int indices) are masked; None masks every row.
    Returns [B] int64."""
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("masked_argmax needs the logits and the bitmask contiguous in V")
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    has_mask = bitmask  # unread when every row is masked
    if rows is not None:
        # scatter_, not has_mask[rows] = 1: that index_put syncs with the host on CUDA.
        has_mask = torch.zeros(batch, dtype=torch.int8, device=logits.device)
        has_mask.scatter_(0, rows.long(), 1)
    num_tiles = triton.cdiv(vocab, 32 * _TILE_WORDS)
    partial = torch.empty(batch, num_tiles, dtype=torch.int64, device=logits.device)
    pdl = pdl_kwargs(logits)
    _tile_max_kernel[(batch, num_tiles)](
        logits, bitmask, has_mask, partial, logits.stride(0), bitmask.stride(0), vocab,
        bitmask.shape[-1], num_tiles, HAS_ROWS=rows is not None, TILE_WORDS=_TILE_WORDS,
        num_warps=8, **pdl)
    _row_max_kernel[(batch,)](partial, out, num_tiles,
                              BLOCK_TILES=triton.next_power_of_2(num_tiles), num_warps=1,
                              **pdl)
    return out


def masked_argmax_reference(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor | None = None) -> torch.Tensor:
    """masked_argmax in PyTorch: the -inf mask of apply_token_bitmask_inplace, then argmax."""
    x = logits.float().clone()
    covered = min(x.shape[-1], 32 * bitmask.shape[-1])
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    blocked = (bits == 0).flatten(1)[:, :covered]
    if rows is not None:
        listed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        listed[rows.long()] = True
        blocked &= listed.unsqueeze(1)
    x[:, :covered].masked_fill_(blocked, float("-inf"))
    return x.argmax(dim=-1)
