"""DP-attention: the ranks of one expert-parallel world step together.

Under --enable-dp-attention each rank runs its own `Scheduler` over its own requests
and KV cache (the DP controller routes requests to ranks as it routes them to
replicas), but every MoE layer is one all-to-all over all ranks, so the ranks must run
their forward passes together:

* `has_work` is a vote over the group (any rank busy -> every rank steps), so a rank
  with nothing to do still enters the step its peers enter;
* a step runs at most one forward pass on each rank (speculative decoding is refused
  with DP-attention); a rank whose step ran none runs the MoE layers' collectives with
  no tokens instead (SGLang's IDLE batch), so every rank's layer i meets its peers'.

The wrapper calls has_work the same number of times on every rank because the loop
around it (SchedulerLoop, or a test's) does: every call is a collective.
"""

from __future__ import annotations

from typing import Any

from radixserve.distributed.ep_group import EpGroup, init_dp_attention_group
from radixserve.managers.io_struct import (BatchTokenIDOut, ExpertDistributionReq,
                                           ExpertDistributionReqOutput, ServerInfo,
                                           TokenizedGenerateReqInput)
from radixserve.managers.request_validation import ModelLimits
from radixserve.managers.scheduler import Scheduler
from radixserve.managers.scheduler_interface import SchedulerInterface
from radixserve.server_args import ServerArgs


class DpAttentionScheduler(SchedulerInterface):
    def __init__(self, scheduler: Scheduler, group: EpGroup) -> None:
        if scheduler.model_runner.experts is None:
            raise ValueError("DP-attention needs a model with expert-parallel MoE layers")
        self.scheduler = scheduler
        self.group = group
        self.model_config = scheduler.model_config
        self.tokenizer = scheduler.tokenizer
        self.idle_passes = 0

    def model_limits(self) -> ModelLimits:
        return self.scheduler.model_limits()

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        self.scheduler.add_request(recv)

    def abort_request(self, rid: str) -> None:
        self.scheduler.abort_request(rid)

    def has_work(self) -> bool:
        """Collective: whether any rank has work."""
        return self.group.any_true(self.scheduler.has_work())

    def step(self) -> BatchTokenIDOut | None:
        runner = self.scheduler.model_runner
        before = runner.forward_passes
        out = self.scheduler.step()
        ran = runner.forward_passes - before
        if ran == 0:
            runner.experts.idle_pass()
            self.idle_passes += 1
        elif ran > 1:
            raise RuntimeError(f"a DP-attention step ran {ran} forward passes; the ranks' "
                               f"collectives no longer line up")
        return out

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def expert_distribution(self, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
        """This rank's alone: the ranks answer at different moments, so a collective
        here could meet a peer's step; the DP controller sums the answers."""
        return self.scheduler.expert_distribution(ExpertDistributionReq(req.action, False))

    def get_server_info(self) -> ServerInfo:
        return self.scheduler.get_server_info()

    def shutdown(self) -> Any:
        return None


def join_dp_attention(server_args: ServerArgs, rank: int, dist_addr: str
                      ) -> DpAttentionScheduler:
    """A DP-attention rank's scheduler process: join the world, load the model (whole
    but for its experts), and wrap its scheduler so that it steps with its peers."""
    group = init_dp_attention_group(server_args.parallel_config(), rank, dist_addr)
    return DpAttentionScheduler(Scheduler(server_args, dp_rank=rank), group)
