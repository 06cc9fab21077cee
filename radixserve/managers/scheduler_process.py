"""The server's scheduler process: a message loop around `Scheduler`.

The offline Engine drives the same `Scheduler` in-process (calling add_request /
step itself); here the requests arrive over ZMQ from the TokenizerManager and the
token outputs leave for the detokenizer process (docs/architecture.md, "Processes").
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection
from collections.abc import Callable
from typing import Any

import zmq

from radixserve.managers.io_struct import (
    AbortReq,
    ExpertDistributionReq,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetServerInfoReq,
    RegisterStopStrsReq,
    TokenizedGenerateReqInput,
)
from radixserve.managers.ipc import (MALFORMED, PortArgs, recv_message, start_parent_watchdog,
                                     zmq_socket)
from radixserve.managers.request_validation import RequestValidator
from radixserve.managers.scheduler_interface import SchedulerInterface
from radixserve.managers.step_watchdog import StepWatchdog
from radixserve.metrics.log_format import configure_logging
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# How long an idle scheduler blocks waiting for a request before checking again.
_IDLE_POLL_MS = 50


def model_info(scheduler: SchedulerInterface) -> dict[str, Any]:
    """What the TokenizerManager needs to validate requests without the model: the
    scheduler's ModelLimits (context_len, vocab_size, max_total_num_tokens -- the
    smallest replica's under DP --, eos_token_ids, generation_defaults) as a dict, with
    the checkpoint's model_type and architectures (for /get_model_info)."""
    hf_config = scheduler.model_config.hf_config
    return {"model_path": scheduler.model_config.model_path,
            "model_type": getattr(hf_config, "model_type", None),
            "architectures": list(getattr(hf_config, "architectures", None) or []),
            **scheduler.model_limits().to_model_info()}


class SchedulerLoop:
    """Owns the sockets; `run_forever` alternates receiving requests and stepping."""

    def __init__(self, scheduler: SchedulerInterface, port_args: PortArgs,
                 watchdog_timeout: float | None = None, dp_rank: int | None = None) -> None:
        self.scheduler = scheduler
        self.dp_rank = dp_rank  # a DP replica's: stamped on its server info
        self.watchdog = StepWatchdog(watchdog_timeout)
        # To read a message's stop strings only once they are known to be sound.
        self.validator = RequestValidator(scheduler.model_limits())
        context = zmq.Context(2)
        self.recv = zmq_socket(context, zmq.PULL, port_args.scheduler_input_ipc, bind=True)
        self.to_detokenizer = zmq_socket(context, zmq.PUSH, port_args.detokenizer_ipc, bind=False)
        self.to_tokenizer = zmq_socket(context, zmq.PUSH, port_args.tokenizer_ipc, bind=False)

    def run_forever(self) -> None:
        while True:
            busy = self.scheduler.has_work()
            if busy or self.recv.poll(_IDLE_POLL_MS):
                self._drain_requests()
            if self.scheduler.has_work():
                self.watchdog.begin()
                out = self.scheduler.step()
                self.watchdog.end()
                if out is not None and out.rids:
                    self.to_detokenizer.send_pyobj(out)

    def _drain_requests(self) -> None:
        while True:
            try:
                msg = recv_message(self.recv, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._dispatch(msg)
            except Exception:  # one message must not take down every other request
                logger.exception("scheduler failed to handle %r", type(msg).__name__)

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            if self.validator.is_well_formed(msg):
                # Sent ahead of any output on the same socket, so it arrives first.
                stops = msg.sampling_params.stop_strs
                if stops:
                    self.to_detokenizer.send_pyobj(RegisterStopStrsReq(msg.rid, list(stops)))
            # add_request answers a malformed one with a 400 for that rid alone.
            self.scheduler.add_request(msg)
        elif isinstance(msg, AbortReq):
            if isinstance(msg.rid, str):
                self.scheduler.abort_request(msg.rid)
            else:
                logger.warning("scheduler ignores an abort whose rid is a %s",
                               type(msg.rid).__name__)
        elif msg is MALFORMED:
            pass  # logged by recv_message
        elif isinstance(msg, FlushCacheReq):
            self.to_tokenizer.send_pyobj(FlushCacheReqOutput(self.scheduler.flush_cache()))
        elif isinstance(msg, GetServerInfoReq):
            info = self.scheduler.get_server_info()
            if self.dp_rank is not None:  # replies reach the DP controller in any order
                info.extra["dp_rank"] = self.dp_rank
            self.to_tokenizer.send_pyobj(info)
        elif isinstance(msg, ExpertDistributionReq):
            self.to_tokenizer.send_pyobj(self.scheduler.expert_distribution(msg))
        else:
            logger.warning("scheduler ignores unexpected message %r", type(msg).__name__)


def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs,
                          ready_pipe: Connection, dp_rank: int = 0,
                          dist_addr: str | None = None) -> None:
    """Process entry: load the model, report readiness + model info, loop forever.
    Under TP this is rank 0 of its replica, joining the group at `dist_addr`.

    Any exception is logged and ends the process with a non-zero code; the API
    server notices (its /health turns 503) and shuts down.
    """
    setup_worker_process(server_args, "scheduler" if server_args.tp_size == 1 else f"dp{dp_rank} tp0")

    def make_scheduler() -> Any:
        from radixserve.managers.scheduler import Scheduler

        if server_args.enable_dp_attention:
            from radixserve.managers.dp_attention import join_dp_attention

            return join_dp_attention(server_args, dp_rank, str(dist_addr))
        if server_args.tp_size > 1:
            from radixserve.distributed.parallel_state import init_tp_group
            from radixserve.managers.tp_sync import TpScheduler

            group = init_tp_group(server_args.parallel_config(), 0, str(dist_addr), dp_rank)
            return TpScheduler(Scheduler(server_args, dp_rank=dp_rank), group)
        from radixserve.distributed.parallel_state import bind_device

        bind_device(server_args.parallel_config(), 0, dp_rank)  # DP replica d takes GPU d
        return Scheduler(server_args, dp_rank=dp_rank)

    serve_scheduler_loop(make_scheduler, port_args, ready_pipe, "scheduler",
                         server_args.watchdog_timeout,
                         dp_rank if server_args.dp_size > 1 else None)


def serve_scheduler_loop(make_scheduler: Callable[[], SchedulerInterface], port_args: PortArgs,
                         ready_pipe: Connection, what: str,
                         watchdog_timeout: float | None = None,
                         dp_rank: int | None = None) -> None:
    """Build the scheduler (or anything with its interface), report readiness and model
    info through the pipe, then loop forever; a failure at either stage is logged and
    ends the process non-zero, which the API server watches for."""
    try:
        scheduler = make_scheduler()
        loop = SchedulerLoop(scheduler, port_args, watchdog_timeout, dp_rank)
        ready_pipe.send({"status": "ready", **model_info(scheduler)})
    except Exception as exc:
        logger.exception("%s failed to start", what)
        ready_pipe.send({"status": "error", "message": repr(exc)})
        sys.exit(1)
    try:
        loop.run_forever()
    except Exception:
        logger.exception("%s crashed", what)
        sys.exit(1)


def run_tp_follower_process(server_args: ServerArgs, tp_rank: int, dp_rank: int,
                            dist_addr: str, ready_pipe: Connection) -> None:
    """Process entry of TP rank > 0: the same Scheduler, driven by rank 0's broadcasts."""
    setup_worker_process(server_args, f"dp{dp_rank} tp{tp_rank}")
    try:
        from radixserve.distributed.parallel_state import init_tp_group
        from radixserve.managers.scheduler import Scheduler

        group = init_tp_group(server_args.parallel_config(), tp_rank, dist_addr, dp_rank)
        scheduler = Scheduler(server_args)
        ready_pipe.send({"status": "ready"})
    except Exception as exc:
        logger.exception("TP rank %d failed to start", tp_rank)
        ready_pipe.send({"status": "error", "message": repr(exc)})
        sys.exit(1)
    from radixserve.managers.tp_sync import run_follower_loop

    try:
        run_follower_loop(scheduler, group)
    except Exception:
        # Most often rank 0 is gone: gloo reports the closed connection.
        logger.exception("TP rank %d of DP replica %d lost its group; exiting", tp_rank,
                         dp_rank)
        sys.exit(1)


def setup_worker_process(server_args: ServerArgs, name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent shuts us down
    configure_logging(server_args.log_level, name)
    start_parent_watchdog()
