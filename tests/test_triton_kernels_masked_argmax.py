"""The masked-argmax kernel against its PyTorch reference, and the reference against
today's logits-processor path (float32 copy, xgrammar's mask, argmax): ids must be equal,
on small awkward shapes, with ties, -inf and NaN logits and narrow or single-token masks.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
before the kernel module is imported).
"""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import xgrammar as xgr  # noqa: E402

from radixserve.layers.triton_kernels.masked_argmax import (  # noqa: E402
    masked_argmax, masked_argmax_reference)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(batch: int, vocab: int, kind: str, dtype: torch.dtype,
                gen: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # few distinct values: many rows have several maxima
        x = torch.randint(-2, 3, (batch, vocab), generator=gen).float()
    else:
        x = torch.randn(batch, vocab, generator=gen)
    if kind == "inf":
        x[0] = float("-inf")  # a whole row of -inf: argmax 0, allowed or not
        x[-1, ::2] = float("-inf")
        x[:, -5:] = float("inf")
    if kind == "zeros":  # the max is a zero: -0.0 and +0.0 tie, the first one wins
        x = -x.abs()
        x[:, 1::3] = -0.0
        x[:, 2::5] = 0.0
    if kind == "nan":
        x[0, vocab // 3] = float("nan")  # NaN wins, as in torch.argmax
        x[-1, vocab - 1] = float("nan")
        x[-1, 7] = float("nan")
    return x.to(DEVICE, dtype)


def make_bitmask(batch: int, vocab: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    words = (vocab + 31) // 32
    if kind == "narrow":  # covers fewer tokens than the logits: the rest stay allowed
        words = max(1, (vocab - 70) // 32)
    if kind == "wide":  # covers more tokens than the logits
        words += 2
    if kind == "single":  # one allowed token per row
        bits = torch.zeros(batch, words * 32, dtype=torch.bool)
        bits[torch.arange(batch), torch.randint(0, vocab, (batch,), generator=gen)] = True
    elif kind == "none":
        bits = torch.zeros(batch, words * 32, dtype=torch.bool)
    else:
        bits = torch.rand(batch, words * 32, generator=gen) < 0.3
    # Bit j of word w is token 32 * w + j; bit 31 makes the int32 word negative.
    packed = (bits.view(batch, words, 32).long() << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(DEVICE, torch.int32)


def processor_path(logits: torch.Tensor, bitmask: torch.Tensor,
                   rows: torch.Tensor | None) -> torch.Tensor:
    """Today's path: what the Sampler computed for every grammar batch before."""
    x = logits.to(torch.float32, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the narrow bitmask warns that it is narrow
        xgr.apply_token_bitmask_inplace(x, bitmask, indices=rows)
    return x.argmax(dim=-1)


def pick_rows(batch: int, subset: bool, gen: torch.Generator) -> torch.Tensor | None:
    if not subset:
        return None
    n = max(1, batch // 2)
    return torch.randperm(batch, generator=gen)[:n].sort().values.to(DEVICE, torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,vocab", [(1, 1000), (3, 4099), (17, 1000), (3, 33),
                                         (1, 9000)])
@pytest.mark.parametrize("subset", [False, True])
def test_masked_argmax_matches_reference(batch: int, vocab: int, dtype: torch.dtype,
                                         subset: bool) -> None:
    gen = torch.Generator().manual_seed(batch * vocab + len(str(dtype)) + subset)
    for logits_kind, mask_kind in [("randn", "random"), ("ties", "random"),
                                   ("ties", "single"), ("inf", "random"),
                                   ("nan", "narrow"), ("zeros", "random"),
                                   ("randn", "none")]:
        logits = make_logits(batch, vocab, logits_kind, dtype, gen)
        bitmask = make_bitmask(batch, vocab, mask_kind, gen)
        rows = pick_rows(batch, subset, gen)
        expected = masked_argmax_reference(logits, bitmask, rows)
        got = masked_argmax(logits, bitmask, rows)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected), (logits_kind, mask_kind, got, expected)


@pytest.mark.parametrize("logits_kind", ["randn", "ties", "inf", "nan", "zeros"])
@pytest.mark.parametrize("mask_kind", ["random", "single", "none", "narrow", "wide"])
@pytest.mark.parametrize("subset", [False, True])
def test_reference_matches_processor_path(logits_kind: str, mask_kind: str,
                                          subset: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    for batch, vocab in [(1, 1000), (3, 4099), (17, 100)]:
        logits = make_logits(batch, vocab, logits_kind, torch.bfloat16, gen)
        bitmask = make_bitmask(batch, vocab, mask_kind, gen)
        rows = pick_rows(batch, subset, gen)
        assert torch.equal(masked_argmax_reference(logits, bitmask, rows),
                           processor_path(logits, bitmask, rows))


def test_kernel_on_strided_rows_and_wide_mask() -> None:
    """Rows of a wider buffer (the logits of a padded vocabulary), a bitmask wider than
    the vocabulary, an empty row list and an empty batch."""
    gen = torch.Generator().manual_seed(3)
    full = make_logits(5, 4160, "ties", torch.float32, gen)
    logits = full[:, :4099]
    bitmask = make_bitmask(5, 4099, "wide", gen)
    assert torch.equal(masked_argmax(logits, bitmask), processor_path(logits, bitmask, None))
    no_rows = torch.empty(0, dtype=torch.int32, device=DEVICE)
    assert torch.equal(masked_argmax(logits, bitmask, no_rows), logits.argmax(-1))
    empty = masked_argmax(logits[:0], bitmask[:0])
    assert empty.shape == (0,) and empty.dtype == torch.int64
