"""STANDALONE drafting: a smaller model with the target's tokenizer proposes the chain.

The draft model has its own KV pool of the target's size and shares the target's
req_to_token rows: a KV slot means the same position of the same request in both
pools, so the radix cache, the allocator and the freeing of rejected drafts serve both
models at once. The draft runs every prefill the target runs, then, per decode step,
its drafts one token at a time (greedy: its proposal is one token, which the
verification rule in verify.py expects).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from radixserve.configs.load_config import LoadConfig
from radixserve.configs.model_config import ModelConfig
from radixserve.configs.runner_config import RunnerConfig
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.speculative.forward_inputs import run_extend


def make_draft_runner(runner_config: RunnerConfig, draft_load: LoadConfig,
                      target: ModelRunner) -> ModelRunner:
    """The draft model with a KV pool slot for every slot of the target's."""
    model_config = ModelConfig.from_load_config(draft_load)
    if model_config.context_len < target.model_config.context_len:
        raise ValueError(f"the draft model's context ({model_config.context_len}) is "
                         f"shorter than the target's ({target.model_config.context_len})")
    cfg = dataclasses.replace(
        runner_config, load=draft_load, max_total_tokens=target.max_total_num_tokens,
        max_running_requests=target.max_running_requests, disable_cuda_graph=True,
        disable_cascade_attention=True)
    runner = ModelRunner(cfg, model_config)
    runner.req_to_token_pool = target.req_to_token_pool
    return runner


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        # Per request: how many of its newest KV positions lack the draft's KV (a step
        # whose drafts were all accepted ends one past the draft's last forward; a step
        # that drafted nothing leaves its token out).
        self._gap: weakref.WeakKeyDictionary[Req, int] = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def on_extend(self, batch: ScheduleBatch) -> None:
        self.runner.forward(self.runner.build_forward_batch(batch))
        for req in batch.reqs:
            self._gap[req] = 0

    @torch.inference_mode()
    def propose(self, reqs: list[Req], budgets: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in reqs]
        pool = self.runner.req_to_token_pool
        active = [i for i, k in enumerate(budgets) if k > 0]
        step = 0
        while active:
            rows, tokens, starts, slots = [], [], [], []
            for i in active:
                req = reqs[i]
                last = req.kv_committed_len  # position of the newest token
                if step == 0:
                    first = last - self._gap.get(req, 0)
                    run = req.all_ids[first:last + 1]
                else:
                    first = last + step
                    run = [drafts[i][-1]]
                rows.append(req.req_pool_idx)
                tokens.append(run)
                starts.append(first)
                slots.append(pool.read(req.req_pool_idx, first + len(run))[first:])
            logits = run_extend(self.runner, rows, tokens, starts, torch.cat(slots),
                                last_only=True)
            for i, t in zip(active, logits.argmax(dim=-1).tolist()):
                drafts[i].append(t)
            step += 1
            active = [i for i in active if len(drafts[i]) < budgets[i]]
        return drafts

    def on_verified(self, reqs: list[Req], drafts: list[list[int]],
                    accepted: list[int]) -> None:
        for req, d, a in zip(reqs, drafts, accepted):
            if d:
                # The draft wrote positions up to seqlen - 2 + len(d); the target's KV
                # now ends at seqlen - 1 + a.
                self._gap[req] = max(0, a - len(d) + 1)
            else:
                self._gap[req] = self._gap.get(req, 0) + 1
