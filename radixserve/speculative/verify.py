"""Chain verification: which drafted tokens the target accepts, and the token it adds.

Request i's verify pass ran its last token and its drafts d_1..d_k through the target;
logits row j predicts the token after d_j (row 0: after the last token). Drafts are
deterministic proposals (the n-gram lookup, or a draft model's argmax), so:

* greedy rows accept d_{j+1} while it is the argmax of row j, then add the argmax of the
  first row that disagrees: exactly the tokens of decoding without speculation;
* sampled rows accept d_{j+1} with probability p_j(d_{j+1}), p_j being the distribution
  the sampler would draw from at row j; at the first rejection they draw from p_j with
  d_{j+1} removed (the residual max(p - q, 0) for a one-hot proposal q), and after the
  last draft from p_k. Each emitted token then has exactly the target's distribution.

The thresholds relax the rule as SGLang's do: a draft is also accepted when
p >= threshold_single, and with probability p / threshold_acc; both at 1 keep it exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.core.req import Req
from radixserve.layers.sampler import sampling_probs
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo


@dataclass(frozen=True)
class AcceptRule:
    threshold_single: float = 1.0
    threshold_acc: float = 1.0


def verify_chain(logits: torch.Tensor, reqs: list[Req], drafts: list[list[int]],
                 rule: AcceptRule, generator: torch.Generator | None = None
                 ) -> list[list[int]]:
    """Per request, the tokens this step yields: its accepted drafts, then one token of
    the target's. `logits`: float32 [sum(1 + len(d)), V], the rows of each request in
    order. No request here has logits processors (penalties, grammar, min_new_tokens):
    the worker runs those without speculation."""
    counts = [1 + len(d) for d in drafts]
    row_reqs = [r for r, c in zip(reqs, counts) for _ in range(c)]
    greedy = [r.sampling_params.top_k == 1 for r in reqs]  # as the sampler decides
    dev = logits.device
    # The draft each row is asked to judge (-1 after a request's last draft).
    next_draft = [t for d in drafts for t in (*d, -1)]
    nd = torch.tensor(next_draft, dtype=torch.int64).to(dev)
    argmax = logits.argmax(dim=-1)
    accept = argmax == nd
    probs = None
    if not all(greedy):
        info = SamplingBatchInfo.from_reqs(row_reqs, logits.shape[-1], dev)
        probs = sampling_probs(logits, info)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        p_draft = probs.gather(1, nd.clamp(min=0).unsqueeze(1)).squeeze(1)
        coins = torch.rand(p_draft.shape, device=dev, generator=generator)
        sampled_ok = (coins < p_draft / rule.threshold_acc) | (p_draft >= rule.threshold_single)
        row_greedy = torch.tensor([g for g, c in zip(greedy, counts) for _ in range(c)],
                                  device=dev)
        accept = torch.where(row_greedy, accept, sampled_ok & (nd >= 0))
    accept_host = accept.tolist()
    start = 0
    accepted: list[int] = []
    final_rows: list[int] = []
    for c in counts:
        a = 0
        while a < c - 1 and accept_host[start + a]:
            a += 1
        accepted.append(a)
        final_rows.append(start + a)
        start += c
    rows_t = torch.tensor(final_rows, dtype=torch.int64).to(dev)
    last = argmax[rows_t]
    if probs is not None:
        dist = probs[rows_t].clone()
        rejected = [a < len(d) for a, d in zip(accepted, drafts)]
        rej_rows = [i for i, r in enumerate(rejected) if r]
        if rej_rows:
            rej_t = torch.tensor(rej_rows, dtype=torch.int64).to(dev)
            rej_tok = torch.tensor([drafts[i][accepted[i]] for i in rej_rows],
                                   dtype=torch.int64).to(dev)
            dist[rej_t, rej_tok] = 0.0
        drawn = torch.multinomial(dist, 1, generator=generator).squeeze(1)
        greedy_t = torch.tensor(greedy, device=dev)
        last = torch.where(greedy_t, last, drawn)
    last_host = last.tolist()
    return [d[:a] + [t] for d, a, t in zip(drafts, accepted, last_host)]
