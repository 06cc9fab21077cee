"""Speculative decoding: draft several tokens per request, verify them in one target
forward, keep the longest prefix the target agrees with (plus one token of its own).

`make_batch_worker` gives the scheduler its worker (managers/batch_worker.py): the
target's ModelRunner when speculation is off, else a SpeculativeWorker around it with
the drafter of the algorithm (ngram.py: NGRAM; draft_model.py: STANDALONE). The
verification rule is in verify.py; the drafters never decide what is accepted.
"""

from __future__ import annotations

from radixserve.configs.runner_config import RunnerConfig
from radixserve.configs.speculative_config import SpeculativeConfig
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.speculative.drafter import Drafter
from radixserve.speculative.worker import MakeRoom, SpeculativeWorker


def make_drafter(config: SpeculativeConfig, target: ModelRunner,
                 runner_config: RunnerConfig) -> Drafter:
    if config.algorithm == "NGRAM":
        from radixserve.speculative.ngram import NgramDrafter

        return NgramDrafter(config)
    if config.algorithm == "STANDALONE":
        from radixserve.speculative.draft_model import DraftModelDrafter, make_draft_runner

        assert config.draft_load is not None
        return DraftModelDrafter(make_draft_runner(runner_config, config.draft_load, target))
    raise ValueError(f"speculative algorithm {config.algorithm} is not implemented")


def make_batch_worker(config: SpeculativeConfig | None, target: ModelRunner,
                      runner_config: RunnerConfig,
                      make_room: MakeRoom) -> ModelRunner | SpeculativeWorker:
    """The scheduler's BatchWorker for these settings: `make_room(n)` frees n KV slots
    by evicting cached prefixes (the scheduler's KV accounting owns the cache)."""
    if config is None:
        return target
    return SpeculativeWorker(target, make_drafter(config, target, runner_config), config,
                             make_room)
