"""Batched next-token sampling, and the logprobs of the chosen tokens.

Sampling is an exponential race: token i wins when p_i / E_i is largest, with E_i
independent Exp(1) draws, which picks i with probability exactly p_i. The race needs no
normalisation after filtering (zeroed tokens can never win) and lets a seeded row draw
its E_i from a counter-based hash of (seed, step, token id): its sample is then a pure
function of those and its probabilities, whatever else is in the batch, without a
per-row generator or a host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from radixserve.layers.lazy_kernels import triton_kernel
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

_MASK32 = 0xFFFFFFFF


class Sampler(torch.nn.Module):
    def __init__(self, fused_grammar_argmax: bool | None = None) -> None:
        """`fused_grammar_argmax`: whether a greedy batch whose only logits processor is
        a grammar mask takes the masked-argmax kernel instead of the float32 copy, the
        mask and the argmax (same ids). None: on CUDA when Triton imports; True also runs
        it on CPU tensors, in Triton's interpreter."""
        super().__init__()
        self.fused_grammar_argmax = fused_grammar_argmax

    def forward(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """Next token of every row ([B] int64) from `logits` ([B, V]); `logits` is not modified.

        Order: logits processors (penalties, logit_bias, min_new_tokens, grammar mask),
        temperature, then the top-k, top-p and min-p filters, then the draw. Greedy rows
        (top_k == 1) return exactly the argmax of the processed logits, also inside a
        mixed batch.
        """
        mask = info.vocab_mask
        if mask is not None and info.is_all_greedy and info.has_only_grammar_mask:
            kernel = self._masked_argmax(logits)
            if kernel is not None:
                return kernel(logits, mask.bitmask, mask.rows)
        if info.has_logits_processors:
            logits = logits.to(torch.float32, copy=True)
            info.apply_logits_processors(logits)
        elif info.is_all_greedy:
            # Any float dtype converts to float32 exactly, so its argmax is the same:
            # skip the [B, V] float32 copy.
            return logits.argmax(dim=-1)
        else:
            logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if info.is_all_greedy:
            return greedy
        probs = sampling_probs(logits, info)
        sampled = probs.div_(_exponentials(probs, info)).argmax(dim=-1)
        return torch.where(info.top_ks == 1, greedy, sampled)

    def _masked_argmax(self, logits: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        use = self.fused_grammar_argmax
        if use is False or (use is None and not logits.is_cuda):
            return None
        return triton_kernel("radixserve.layers.triton_kernels.masked_argmax", "masked_argmax")


def sampling_probs(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """What a sampled row draws from: softmax at its temperature, then top-k, top-p and
    min-p ([B, V] float32, not renormalised after filtering). `logits` are float32 with
    the logits processors already applied. Speculative verification reads it too, so
    that accepting a draft keeps exactly this distribution."""
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_top_p_top_k:
        return _top_k_top_p_min_p(probs, info)
    if info.need_min_p:
        return _min_p(probs, info.min_ps)
    return probs


def _top_k_top_p_min_p(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero the tokens outside top-k, top-p and min-p, all judged on the unfiltered probs.

    Judging each filter on the original distribution (as SGLang does) makes the kept set
    their intersection, so the order of the filters does not matter. The top token always
    survives: its rank is 0, its preceding mass is 0, and it is the max for min-p.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # A float32 cumsum can end a little above 1: top_p == 1 must never drop the tail.
    top_ps = info.top_ps.masked_fill(info.top_ps >= 1.0, float("inf")).unsqueeze(1)
    drop = (ranks >= info.top_ks.unsqueeze(1)) | (mass_before > top_ps)
    if info.need_min_p:
        drop |= sorted_probs < sorted_probs[:, :1] * info.min_ps.unsqueeze(1)
    sorted_probs.masked_fill_(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _min_p(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    threshold = probs.amax(dim=-1, keepdim=True) * min_ps.unsqueeze(1)
    return probs.masked_fill_(probs < threshold, 0.0)


def _exponentials(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Exp(1) draws shaped like probs: hashed for seeded rows, torch's RNG for the rest."""
    # rand() is in [0, 1): u == 0 gives E = inf, whose ratio 0 never wins; E is never 0.
    uniforms = torch.rand_like(probs)
    if info.seeded_rows is not None and info.seeds is not None and info.steps is not None:
        # Only the seeded rows pay for the hash; the row list was fixed on the host.
        rows = info.seeded_rows
        hashed = _hashed_uniforms(info.seeds[rows], info.steps[rows], probs.shape[-1])
        uniforms.index_copy_(0, rows, hashed)
    return uniforms.log_().neg_()


def _hashed_uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), each a hash of (seed, step, token id)."""
    # Distinct salts for the step and the token chains: _mix32(0) == 0, so unsalted keys
    # would make seed s at token t equal seed t at token s for small s and t.
    step_key = _mix32((steps & _MASK32) ^ _STEP_SALT)
    row_key = _mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) ^ step_key))
    token_key = _mix32(torch.arange(vocab_size, device=seeds.device) ^ _TOKEN_SALT)
    bits = _mix32(row_key.unsqueeze(1) ^ token_key.unsqueeze(0))
    # 23 bits plus the half fit float32's 24-bit significand exactly; the half keeps u
    # away from both 0 and 1.
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so the product
# is exact in int64 on every device instead of relying on signed overflow wrapping.
_MIX_A = 0x7FEB352D
_MIX_B = 0x5BD1E995
_STEP_SALT = 0x9E3779B9
_TOKEN_SALT = 0x632BE5AB


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A MurmurHash3-style finaliser on int64 tensors holding 32-bit values: a bijection
    in which every output bit depends on every input bit, so neighbouring (seed, step,
    token) keys give unrelated uniforms."""
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _MASK32
    return x ^ (x >> 16)


def get_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_logprobs_nums: list[int],
) -> tuple[list[float], list[list[tuple[float, int]]]]:
    """Logprob of each row's chosen token, and its top-n (logprob, token id) list.

    The logprobs are log_softmax of the RAW logits, before penalties, temperature and
    top-k/top-p/min-p filtering: the model's own distribution, which is what OpenAI API
    users expect from `logprobs`. `top_logprobs_nums[i]` is n for row i (0 for none).
    Everything comes to the host in one transfer.
    """
    if len(top_logprobs_nums) != logits.shape[0] or token_ids.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)}, token_ids {tuple(token_ids.shape)} "
                         f"and {len(top_logprobs_nums)} top_logprobs_nums disagree on B")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1))
    k = min(max(top_logprobs_nums, default=0), logits.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    # float64 holds both the float32 logprobs and any token id exactly: one tensor, one copy.
    packed = torch.cat([chosen.double(), top_values.double(), top_ids.double()], dim=1).tolist()
    token_logprobs = [row[0] for row in packed]
    top_lists = [list(zip(row[1:1 + n], (int(t) for t in row[1 + k:1 + k + n])))
                 for row, n in zip(packed, top_logprobs_nums)]
    return token_logprobs, top_lists
