"""Keeping the schedulers of one TP group in lockstep.

Every rank runs a full `Scheduler` over its shard of the model. The schedulers stay
identical because they see identical inputs at identical points: rank 0 records what
its callers hand it (requests, aborts, cache flushes) and, at the start of each step,
broadcasts the record (plus which grammar compiles it counts as finished) over the TP
group's gloo group; every rank, rank 0 included, applies the same record and then
steps. Scheduling is deterministic given the same inputs (no clocks; the radix cache's
LRU runs on a logical clock) and the sampled ids are rank 0's on every rank (see
ModelRunner), so all ranks choose the same batches and issue the same collectives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from radixserve.distributed.parallel_state import TpGroup
from radixserve.managers.io_struct import (BatchTokenIDOut, ExpertDistributionReq,
                                           ExpertDistributionReqOutput, ServerInfo,
                                           TokenizedGenerateReqInput)
from radixserve.managers.request_validation import ModelLimits
from radixserve.managers.scheduler import Scheduler
from radixserve.managers.scheduler_interface import SchedulerInterface

logger = logging.getLogger(__name__)


@dataclass
class StepCommands:
    """What rank 0 broadcasts before a step: ("add", TokenizedGenerateReqInput),
    ("abort", rid), ("flush", None) or ("experts", ExpertDistributionReq), in arrival
    order."""

    commands: list[tuple[str, Any]] = field(default_factory=list)
    grammar_ready: list[str] = field(default_factory=list)
    step: bool = True  # False: apply only (a flush answered outside a step)


def apply_commands(scheduler: Scheduler, msg: StepCommands) -> list[Any]:
    """Apply rank 0's record to this rank's scheduler; the flush results, in order."""
    scheduler.grammar.ready_rids = set(msg.grammar_ready)
    results = []
    for kind, arg in msg.commands:
        if kind == "add":
            scheduler.add_request(arg)
        elif kind == "abort":
            scheduler.abort_request(arg)
        elif kind == "flush":
            results.append(scheduler.flush_cache())
        elif kind == "experts":  # the recorder: a dump sums over the ranks, here
            results.append(scheduler.expert_distribution(arg))
        else:
            raise ValueError(f"unknown TP command {kind!r}")
    return results


class TpScheduler(SchedulerInterface):
    """Rank 0's scheduler under TP, with the `Scheduler` interface its loop uses."""

    def __init__(self, scheduler: Scheduler, group: TpGroup) -> None:
        self.scheduler = scheduler
        self.group = group
        self.model_config = scheduler.model_config
        self.tokenizer = scheduler.tokenizer
        self._commands: list[tuple[str, Any]] = []

    def model_limits(self) -> ModelLimits:
        """Rank 0's limits: every rank of the group has the same model and KV cache."""
        return self.scheduler.model_limits()

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        self._commands.append(("add", recv))

    def abort_request(self, rid: str) -> None:
        self._commands.append(("abort", rid))

    def has_work(self) -> bool:
        return bool(self._commands) or self.scheduler.has_work()

    def step(self) -> BatchTokenIDOut | None:
        self._broadcast(step=True)
        return self.scheduler.step()

    def flush_cache(self) -> bool:
        self._commands.append(("flush", None))
        return self._broadcast(step=False)[-1]

    def expert_distribution(self, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
        """Applied by every rank at the same point, as a flush is."""
        self._commands.append(("experts", req))
        return self._broadcast(step=False)[-1]

    def get_server_info(self) -> ServerInfo:
        return self.scheduler.get_server_info()

    def shutdown(self) -> None:
        """Let the followers leave their loops."""
        self.group.broadcast_object(None)

    def _broadcast(self, step: bool) -> list[Any]:
        msg = StepCommands(self._commands, self.scheduler.grammar.compiled_rids(), step)
        self._commands = []
        try:
            self.group.broadcast_object(msg)
        except RuntimeError as e:
            raise RuntimeError(f"TP rank 0 lost its group (a rank died or its node stopped): "
                               f"{e}") from e
        return apply_commands(self.scheduler, msg)


def run_follower_loop(scheduler: Scheduler, group: TpGroup) -> None:
    """A rank > 0: apply rank 0's commands and step with it, until it sends None.
    Outputs are dropped: only rank 0 emits."""
    while (msg := group.broadcast_object(None)) is not None:
        apply_commands(scheduler, msg)
        if msg.step:
            scheduler.step()
