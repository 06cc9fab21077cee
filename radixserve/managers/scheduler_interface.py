"""The interface every scheduler-shaped front implements: the Scheduler itself, its TP
wrapper (TpScheduler, rank 0 of a TP group) and the DataParallelController (replicas
in other processes). The Engine and the server's scheduler loop see only this."""

from __future__ import annotations

from typing import Any, Protocol

from radixserve.configs.model_config import ModelConfig
from radixserve.managers.io_struct import (BatchTokenIDOut, ExpertDistributionReq,
                                           ExpertDistributionReqOutput, ServerInfo,
                                           TokenizedGenerateReqInput)
from radixserve.managers.request_validation import ModelLimits


class SchedulerInterface(Protocol):
    model_config: ModelConfig
    tokenizer: Any  # None under --skip-tokenizer-init

    def model_limits(self) -> ModelLimits:
        """What a request must fit (context, vocabulary, KV capacity) and the model's
        generation defaults: the input of the one validation path."""

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        """Queue a request; an invalid one is answered as finished with a 400 reason."""

    def abort_request(self, rid: str) -> None:
        """Abort a request by rid (no-op if unknown); it frees everything it holds."""

    def has_work(self) -> bool:
        """Whether `step` has anything to do (requests queued, running or to report)."""

    def step(self) -> BatchTokenIDOut | None:
        """One iteration; the token outputs it produced, if any."""

    def flush_cache(self) -> bool:
        """Drop the prefix cache; False while requests hold KV."""

    def expert_distribution(self, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
        """The expert-load recorder's start / stop / dump (managers/expert_record.py)."""

    def get_server_info(self) -> ServerInfo:
        """Pool and queue state, for /get_server_info, metrics and leak checks."""
