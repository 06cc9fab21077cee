"""Sampler, SamplingBatchInfo, penalties and logprobs: on CPU, and on CUDA when present."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    # Sampler(fused_grammar_argmax=True) runs its Triton kernel in the CPU interpreter,
    # which must be on before the kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import xgrammar as xgr  # noqa: E402

from radixserve.constrained.xgrammar_backend import HostBitmasks, VocabMask  # noqa: E402
from radixserve.core.req import Req  # noqa: E402
from radixserve.core.sampling_params import SamplingParams  # noqa: E402
from radixserve.layers.sampler import Sampler, get_token_logprobs  # noqa: E402
from radixserve.sampling.sampling_batch_info import (  # noqa: E402
    GreedyInfoCache, SamplingBatchInfo)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Upper 1e-4 quantiles of the chi-square distribution (scipy.stats.chi2.isf(1e-4, df)):
# a correct sampler fails a test that uses them with probability 1e-4 over the seeds.
CHI2_CRITICAL_1E4 = {2: 18.42, 7: 29.88}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def fused_argmax_runs_on(device: str) -> bool:
    """Whether the masked-argmax Triton kernel can take tensors on `device`: CUDA, or
    CPU in Triton's interpreter (which is on only where there is no CUDA)."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make_req(i: int = 0, input_ids: tuple[int, ...] = (1, 2, 3), output_ids: tuple[int, ...] = (),
             eos_token_ids: set[int] | None = None, **params: object) -> Req:
    sp = SamplingParams(**params)
    sp.verify()
    sp.normalize()
    req = Req(f"r{i}", list(input_ids), sp, eos_token_ids=eos_token_ids)
    req.output_ids = list(output_ids)
    return req


def sample(logits: torch.Tensor, reqs: list[Req], device: str) -> torch.Tensor:
    info = SamplingBatchInfo.from_reqs(reqs, logits.shape[-1], device)
    return Sampler()(logits.to(device), info).cpu()


def chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


TOY_LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.3, 0.7])


# --- greedy ---------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"top_k": 1}, {"temperature": 0.0},
                                    {"temperature": 0.0, "top_p": 0.5, "seed": 3}])
def test_greedy_equals_argmax(device: str, params: dict) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    reqs = [make_req(i, **params) for i in range(6)]
    assert torch.equal(sample(logits, reqs, device), logits.argmax(-1))


def test_greedy_rows_exact_in_mixed_batch(device: str) -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    reqs = [make_req(i, temperature=0.0) if i % 2 else make_req(i, temperature=1.5, top_p=0.9)
            for i in range(8)]
    tokens = sample(logits, reqs, device)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


# --- seeds ----------------------------------------------------------------------------


def mixed_batch_with(target: Req, logits_row: torch.Tensor) -> tuple[list[Req], torch.Tensor]:
    """`target` at row 5 of 8 requests with other params, seeds and logits."""
    others = [make_req(10, temperature=0.0), make_req(11), make_req(12, top_p=0.5, seed=7),
              make_req(13, top_k=3, temperature=0.6), make_req(14, min_p=0.2, seed=8),
              make_req(15, repetition_penalty=1.3, frequency_penalty=0.5),
              make_req(16, seed=9, top_k=40)]
    reqs = others[:5] + [target] + others[5:]
    logits = torch.randn(8, logits_row.shape[0], generator=torch.Generator().manual_seed(2))
    logits[5] = logits_row
    return reqs, logits


@pytest.mark.parametrize("params", [{"seed": 42}, {"seed": 2**40 + 5, "temperature": 0.8,
                                                   "top_p": 0.95, "min_p": 0.01}])
def test_seeded_sampling_is_reproducible_and_batch_invariant(device: str, params: dict) -> None:
    row = torch.randn(200, generator=torch.Generator().manual_seed(3)) * 0.3
    alone, again, batched = [], [], []
    for step in range(12):
        req = make_req(0, output_ids=(0,) * step, **params)
        alone.append(int(sample(row[None], [req], device)[0]))
        again.append(int(sample(row[None], [req], device)[0]))
        reqs, logits = mixed_batch_with(req, row)
        batched.append(int(sample(logits, reqs, device)[5]))
    assert alone == again == batched
    assert len(set(alone)) > 1  # the step index does move the sample


def test_different_seeds_differ(device: str) -> None:
    flat = torch.zeros(2, 1000)
    first = [sample(flat, [make_req(0, seed=1, output_ids=(0,) * s),
                           make_req(1, seed=2, output_ids=(0,) * s)], device).tolist()
             for s in range(10)]
    # Equal over 10 steps of a 1000-way uniform choice would have probability 1e-30.
    assert [a for a, _ in first] != [b for _, b in first]


# --- distribution ---------------------------------------------------------------------

N_SAMPLES = 20_000


@pytest.mark.parametrize("mode", ["seeds", "steps", "unseeded"])
def test_frequencies_match_softmax(mode: str) -> None:
    temperature = 0.7
    expected = torch.softmax(TOY_LOGITS / temperature, dim=-1)
    if mode == "seeds":
        reqs = [make_req(i, temperature=temperature, seed=i) for i in range(N_SAMPLES)]
        info = SamplingBatchInfo.from_reqs(reqs, 8, "cpu")
    else:
        seed = 123 if mode == "steps" else None
        reqs = [make_req(0, temperature=temperature, seed=seed)] * N_SAMPLES
        info = SamplingBatchInfo.from_reqs(reqs, 8, "cpu")
        if mode == "steps":
            info.steps = torch.arange(N_SAMPLES)  # one request over N_SAMPLES decode steps
        torch.manual_seed(0)
    tokens = Sampler()(TOY_LOGITS.expand(N_SAMPLES, 8), info)
    assert chi_square(tokens, expected) < CHI2_CRITICAL_1E4[7]


def test_top_k_frequencies_match_renormalised_softmax() -> None:
    # Top-3 of TOY_LOGITS is tokens 3, 6, 0; the draw is softmax over just those.
    reqs = [make_req(i, top_k=3, seed=1000 + i) for i in range(N_SAMPLES)]
    info = SamplingBatchInfo.from_reqs(reqs, 8, "cpu")
    tokens = Sampler()(TOY_LOGITS.expand(N_SAMPLES, 8), info)
    kept = torch.tensor([0, 3, 6])
    assert set(tokens.unique().tolist()) <= set(kept.tolist())
    expected = torch.softmax(TOY_LOGITS[kept], dim=-1)
    counts = torch.stack([(tokens == t).sum() for t in kept])
    assert chi_square(torch.repeat_interleave(torch.arange(3), counts), expected) \
        < CHI2_CRITICAL_1E4[2]


# --- filters --------------------------------------------------------------------------


def allowed_tokens(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The kept set computed independently, in float64 and plain Python."""
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept, mass = set(), 0.0
    for rank, t in enumerate(order):
        if (top_k < 1 or rank < top_k) and mass <= top_p and probs[t] >= min_p * probs[order[0]]:
            kept.add(t)
        mass += probs[t]
    return kept


@pytest.mark.parametrize("top_k, top_p, min_p", [
    # Alone, then each of top-k, top-p and min-p as the tightest of the three.
    (5, 1.0, 0.0), (-1, 0.6, 0.0), (-1, 1.0, 0.28), (10, 0.8, 0.05), (20, 0.5, 0.1),
    (8, 0.9, 0.28)])
def test_filters_never_emit_outside_allowed_set(device: str, top_k: int, top_p: float,
                                                min_p: float) -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(4))
    n = 2000
    reqs = [make_req(i, top_k=top_k, top_p=top_p, min_p=min_p, seed=i if i % 2 else None)
            for i in range(n)]
    tokens = set(sample(logits.expand(n, 64), reqs, device).tolist())
    allowed = allowed_tokens(logits, top_k, top_p, min_p)
    assert tokens <= allowed
    assert len(tokens) > 1  # the filter left a real choice and it was used


# --- logits processors ----------------------------------------------------------------


def test_penalties_match_hand_computed_values(device: str) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 4.0]]).repeat(3, 1)
    history = {"input_ids": (0, 3), "output_ids": (1, 1, 4)}
    reqs = [make_req(0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3,
                     **history),
            make_req(1, **history),
            make_req(2, presence_penalty=-0.25, **history)]
    info = SamplingBatchInfo.from_reqs(reqs, 6, device)
    processed = logits.to(device)
    info.apply_logits_processors(processed)
    expected = torch.tensor([
        # repetition over {0, 3, 1, 4}: 2/2, -1*2, -3*2, 1/2; then token 1 (2 times in the
        # output): -2 - 2*0.5 - 0.3; token 4 (once): 0.5 - 0.5 - 0.3. Token 0 is prompt only.
        [1.0, -3.3, 0.5, -6.0, -0.3, 4.0],
        [2.0, -1.0, 0.5, -3.0, 1.0, 4.0],
        [2.0, -0.75, 0.5, -3.0, 1.25, 4.0],
    ])
    torch.testing.assert_close(processed.cpu(), expected)


def test_no_penalty_state_without_penalties() -> None:
    info = SamplingBatchInfo.from_reqs([make_req(0), make_req(1, top_p=0.5)], 10, "cpu")
    assert info.penalties is None and not info.has_logits_processors


def test_greedy_info_cache_reuses_only_plain_greedy_batches() -> None:
    """An all-greedy batch with nothing to process reuses one info per batch size, equal
    to what from_reqs builds; anything a row must process or sample builds afresh."""
    cache = GreedyInfoCache()
    greedy = [make_req(i, temperature=0.0) for i in range(3)]
    first = cache.get(greedy, 10, "cpu")
    assert cache.get([make_req(7, top_k=1) for _ in range(3)], 10, "cpu") is first
    built = SamplingBatchInfo.from_reqs(greedy, 10, "cpu")
    assert first.is_all_greedy and not first.has_logits_processors
    for name in ("temperatures", "top_ps", "top_ks", "min_ps"):
        assert torch.equal(getattr(first, name), getattr(built, name))
    assert cache.get(greedy[:2], 10, "cpu") is not first  # another batch size
    for odd in (make_req(3, temperature=0.7), make_req(3, temperature=0.0, frequency_penalty=0.5),
                make_req(3, temperature=0.0, min_new_tokens=2, eos_token_ids={5})):
        info = cache.get(greedy[:2] + [odd], 10, "cpu")
        assert info is not first and info is not cache.get(greedy[:2] + [odd], 10, "cpu")
    # min_new_tokens already reached: nothing left to block, so the batch is plain again.
    done = make_req(3, output_ids=(1, 1), temperature=0.0, min_new_tokens=2, eos_token_ids={5})
    assert cache.get(greedy[:2] + [done], 10, "cpu") is first


def test_min_new_tokens_masks_eos_and_stop_tokens(device: str) -> None:
    logits = torch.zeros(3, 8)
    logits[:, 5] = 50.0  # EOS is by far the likeliest
    common = {"eos_token_ids": {5}, "stop_token_ids": [2, 99], "min_new_tokens": 3,
              "temperature": 0.0}
    reqs = [make_req(0, output_ids=(1,), **common),
            make_req(1, output_ids=(1, 1, 1), **common),
            make_req(2, output_ids=(1,), ignore_eos=True, **common)]
    info = SamplingBatchInfo.from_reqs(reqs, 8, device)
    processed = logits.to(device)
    info.apply_logits_processors(processed)
    blocked = torch.isinf(processed.cpu())
    assert blocked[0].nonzero().flatten().tolist() == [2, 5]  # id 99 is outside the vocab
    assert not blocked[1].any()
    assert blocked[2].nonzero().flatten().tolist() == [2, 5]
    tokens = Sampler()(logits.to(device), info).cpu()
    assert tokens.tolist()[1] == 5 and tokens.tolist()[0] != 5 and tokens.tolist()[2] != 5


def test_sampler_leaves_input_logits_untouched(device: str) -> None:
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(5)).to(device)
    before = logits.clone()
    reqs = [make_req(0, output_ids=(3,), repetition_penalty=1.5, min_new_tokens=4,
                     eos_token_ids={0}), make_req(1, temperature=0.0)]
    Sampler()(logits, SamplingBatchInfo.from_reqs(reqs, 16, device))
    assert torch.equal(logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_does_not_sync() -> None:
    reqs = [make_req(0, seed=1, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                     output_ids=(4, 5)), make_req(1), make_req(2, temperature=0.0)]
    info = SamplingBatchInfo.from_reqs(reqs, 1000, "cuda")
    greedy = SamplingBatchInfo.from_reqs([make_req(i, temperature=0.0) for i in range(3)],
                                         1000, "cuda")
    greedy.vocab_mask = VocabMask(torch.full((3, 32), -1, dtype=torch.int32, device="cuda"),
                                  torch.tensor([0, 2], dtype=torch.int32, device="cuda"))
    logits = torch.randn(3, 1000, device="cuda")
    Sampler()(logits, greedy)  # compiles the masked-argmax kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        Sampler()(logits, info)
        Sampler()(logits, greedy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- grammar masks --------------------------------------------------------------------


def random_vocab_mask(batch: int, vocab: int, rows: list[int] | None, device: str,
                      gen: torch.Generator) -> VocabMask:
    words = (vocab + 31) // 32
    bits = torch.randint(-2**31, 2**31, (batch, words), generator=gen, dtype=torch.int64)
    bits[0] = 0
    bits[0, 3] = 1 << 5  # row 0 allows one token, 101
    index = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=device)
    return VocabMask(bits.to(device, torch.int32), index)


@pytest.mark.parametrize("batch,vocab,rows", [(1, 1000, None), (3, 4099, [0, 2]),
                                              (17, 1000, None), (17, 4099, [0, 5, 16])])
def test_fused_grammar_argmax_equals_processor_path(device: str, batch: int, vocab: int,
                                                    rows: list[int] | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy batch whose only processor is the grammar mask gives the same ids through
    the masked-argmax kernel as through the float32 copy, xgrammar's mask and argmax;
    batches with other processors or sampled rows keep that path."""
    if not fused_argmax_runs_on(device):
        pytest.skip("Triton runs CPU tensors only in its interpreter, which is off where "
                    "CUDA is: the cuda case runs the kernel there")
    gen = torch.Generator().manual_seed(batch + vocab)
    logits = torch.randint(-3, 4, (batch, vocab), generator=gen).float()  # many ties
    logits[-1, ::3] = float("-inf")
    logits = logits.to(device)
    info = SamplingBatchInfo.from_reqs([make_req(i, temperature=0.0) for i in range(batch)],
                                       vocab, device)
    info.vocab_mask = random_vocab_mask(batch, vocab, rows, device, gen)
    old = Sampler(fused_grammar_argmax=False)(logits, info)
    assert old[0] == 101 or (rows is not None and 0 not in rows)

    def refuse(self: VocabMask, logits: torch.Tensor) -> None:
        raise AssertionError("the fused path must not apply the mask to a copy")

    with monkeypatch.context() as patch:
        patch.setattr(VocabMask, "apply", refuse)
        assert torch.equal(Sampler(fused_grammar_argmax=True)(logits, info), old)
        if device == "cuda":  # the default: fused on CUDA only
            assert torch.equal(Sampler()(logits, info), old)

    before = logits.clone()
    for params in ({"temperature": 0.0, "repetition_penalty": 1.5, "output_ids": (1,)},
                   {"temperature": 0.0, "min_new_tokens": 2, "eos_token_ids": {101}},
                   {"temperature": 0.7, "seed": 3}):
        reqs = [make_req(i, temperature=0.0) for i in range(batch - 1)] + [make_req(9, **params)]
        info = SamplingBatchInfo.from_reqs(reqs, vocab, device)
        info.vocab_mask = random_vocab_mask(batch, vocab, rows, device,
                                            torch.Generator().manual_seed(vocab))
        assert torch.equal(Sampler(fused_grammar_argmax=True)(logits, info),
                           Sampler(fused_grammar_argmax=False)(logits, info))
    assert torch.equal(logits, before)


def test_grammar_masks_from_matchers(device: str) -> None:
    """Masks filled by real matchers and sent to the device (on CUDA, on a side stream
    while a long kernel runs on the current one) give the grammar's tokens."""
    vocab = ["<eos>", "a", "b", "ab", "c", "1", "2", "12"] + [f"t{i}" for i in range(92)]
    tokenizer = xgr.TokenizerInfo(vocab, vocab_size=1000, stop_token_ids=[0])
    compiled = xgr.GrammarCompiler(tokenizer).compile_regex(r"(a|b)+c[12]*")
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(4)]
    matchers[1].accept_token(3)  # "ab": next is a, b, ab or c
    matchers[2] = None  # no grammar
    for t in (1, 4):  # "ac": next is 1, 2, 12 or EOS
        matchers[3].accept_token(t)
    logits = torch.zeros(4, 1000)
    logits[:, 500] = 9.0  # outside every grammar
    logits[:, 2] = logits[:, 6] = 1.0
    logits[:, 7] = logits[:, 3] = 1.0  # ties with 2 and 6: the first one wins
    logits = logits.to(device)
    info = SamplingBatchInfo.from_reqs([make_req(i, temperature=0.0) for i in range(4)],
                                       1000, device)
    info.grammar_matchers = matchers
    buffers = HostBitmasks(pinned=device == "cuda")
    for _ in range(3):  # the host buffers are reused in turn
        if device == "cuda":
            busy = torch.randn(4096, 4096, device=device) / 64
            for _ in range(8):
                busy = busy @ busy
        info.update_vocab_mask(buffers)
        assert info.vocab_mask is not None and info.vocab_mask.rows is not None
        for fused in (True, False) if fused_argmax_runs_on(device) else (False,):
            ids = Sampler(fused_grammar_argmax=fused)(logits, info).tolist()
            assert ids == [2, 2, 500, 6], fused


# --- logprobs -------------------------------------------------------------------------


def test_get_token_logprobs_matches_log_softmax(device: str) -> None:
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(6)).to(device)
    token_ids = torch.tensor([3, 0, 19, 7], device=device)
    nums = [0, 3, 1, 20]
    chosen, tops = get_token_logprobs(logits, token_ids, nums)
    reference = torch.log_softmax(logits.cpu().double(), dim=-1)
    for i in range(4):
        assert math.isclose(chosen[i], float(reference[i, token_ids[i]]), abs_tol=1e-5)
        assert len(tops[i]) == nums[i]
        values, ids = reference[i].sort(descending=True)
        assert [t for _, t in tops[i]] == ids[:nums[i]].tolist()
        for (lp, _), ref in zip(tops[i], values[:nums[i]].tolist()):
            assert math.isclose(lp, ref, abs_tol=1e-5)
        assert all(isinstance(t, int) for _, t in tops[i])


def test_get_token_logprobs_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="disagree"):
        get_token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64), [1])
