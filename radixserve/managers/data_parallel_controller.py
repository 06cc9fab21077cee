"""DataParallelController: one Scheduler-shaped front for scheduler replica processes.

Used when the scheduler cannot live in the caller's process: by the Engine whenever
tp_size or dp_size > 1, and by the API server as its "scheduler" process when
dp_size > 1 (with dp_size == 1 the server talks to TP rank 0 directly). It routes
each request to a replica (`LoadBalancer`), relays the replicas' token outputs, and
fans cache flushes and server-info queries out to all replicas.

Replicas are ordinary scheduler processes (scheduler_process.py) whose output and
reply sockets point here (launcher.replica_port_args). The controller counts a
request as load from dispatch until its finished output passes through, so
shortest-queue routing needs no reports from the replicas.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from radixserve.configs.model_config import ModelConfig
from radixserve.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    ExpertDistributionReq,
    ExpertDistributionReqOutput,
    FlushCacheReq,
    GetServerInfoReq,
    ServerInfo,
    TokenizedGenerateReqInput,
)
from radixserve.managers.expert_record import merge_records
from radixserve.managers.ipc import PortArgs, zmq_socket
from radixserve.managers.launcher import dead_process, replica_port_args, stop_processes
from radixserve.managers.request_validation import ModelLimits, RequestValidator, limits_from
from radixserve.managers.scheduler_interface import SchedulerInterface
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# How long step() waits for replica output before returning None (the server's loop
# must get back to its input socket).
_STEP_POLL_MS = 5
_REPLY_TIMEOUT_S = 60.0
# prefix_affinity: prompts are keyed by their first blocks of this many tokens.
PREFIX_BLOCK = 32
_MAX_PREFIX_BLOCKS = 64
_MAX_PREFIX_KEYS = 1 << 16
# A prefix's replica is kept while it has at most this many more requests than the
# least loaded one; beyond that, cache reuse is not worth the queueing.
AFFINITY_SLACK = 4


class LoadBalancer:
    """Chooses a replica per request: round_robin, shortest_queue, minimum_tokens (the
    fewest outstanding prompt + max_new_tokens tokens) or prefix_affinity (the replica
    that last took the longest shared prefix, else the shortest queue).

    minimum_tokens is for bursts of requests of mixed lengths (offline batches): there
    request counts balance badly. On offline-256, round-robin gives one of two replicas
    52% of the decode work (the sum of context lengths it reads); minimum_tokens, 50.2%.
    """

    def __init__(self, method: str, num_replicas: int) -> None:
        self.method = method
        self.load = [0] * num_replicas  # requests in flight
        self.tokens = [0] * num_replicas  # their prompt + max_new_tokens
        self._next = 0
        self._prefix_owner: OrderedDict[int, int] = OrderedDict()

    def pick(self, input_ids: list[int], max_new_tokens: int = 0) -> int:
        if self.method == "round_robin":
            chosen = self._next
        elif self.method == "shortest_queue":
            chosen = self._shortest()
        elif self.method == "minimum_tokens":
            chosen = self._least(self.tokens)
        else:
            chosen = self._by_prefix(input_ids)
        self._next = (chosen + 1) % len(self.load)
        self.load[chosen] += 1
        self.tokens[chosen] += len(input_ids) + max_new_tokens
        return chosen

    def assign(self, replica: int, tokens: int) -> int:
        """Count a request whose replica was chosen by the client."""
        self.load[replica] += 1
        self.tokens[replica] += tokens
        return replica

    def finished(self, replica: int, tokens: int = 0) -> None:
        """A request picked with `tokens` = len(input_ids) + max_new_tokens is done."""
        self.load[replica] -= 1
        self.tokens[replica] -= tokens

    def _shortest(self) -> int:
        return self._least(self.load)

    def _least(self, loads: list[int]) -> int:
        # Ties go round-robin, so an idle cluster still spreads a burst evenly.
        n = len(loads)
        return min(range(n), key=lambda i: (loads[i], (i - self._next) % n))

    def _by_prefix(self, input_ids: list[int]) -> int:
        keys = prefix_keys(input_ids)
        owner = next((self._prefix_owner[k] for k in reversed(keys)
                      if k in self._prefix_owner), None)
        least = self._shortest()
        chosen = owner if owner is not None and \
            self.load[owner] <= self.load[least] + AFFINITY_SLACK else least
        for k in keys:
            self._prefix_owner[k] = chosen
            self._prefix_owner.move_to_end(k)
        while len(self._prefix_owner) > _MAX_PREFIX_KEYS:
            self._prefix_owner.popitem(last=False)
        return chosen


def prefix_keys(input_ids: list[int]) -> list[int]:
    """One key per whole leading block: key i identifies the first (i + 1) blocks."""
    keys, h = [], 0
    for b in range(min(len(input_ids) // PREFIX_BLOCK, _MAX_PREFIX_BLOCKS)):
        h = hash((h, tuple(input_ids[b * PREFIX_BLOCK:(b + 1) * PREFIX_BLOCK])))
        keys.append(h)
    return keys


class DataParallelController(SchedulerInterface):
    """The `Scheduler` interface the Engine and SchedulerLoop use, over replicas."""

    def __init__(self, server_args: ServerArgs, ctrl: PortArgs, tokenizer: Any = None,
                 processes: dict[str, BaseProcess] | None = None) -> None:
        self.server_args = server_args
        self.model_config = ModelConfig.from_load_config(server_args.load_config())
        self.tokenizer = tokenizer
        self.context_len = self.model_config.context_len
        self._ctrl = ctrl
        # Owned only when the Engine started them; the server's launcher watches its own.
        self._processes = processes or {}
        n = server_args.dp_size
        self._context = zmq.Context(1)
        self._to_replica = [zmq_socket(self._context, zmq.PUSH,
                                       replica_port_args(ctrl, d).scheduler_input_ipc, bind=False)
                            for d in range(n)]
        self._outputs = zmq_socket(self._context, zmq.PULL, ctrl.detokenizer_ipc, bind=True)
        self._replies = zmq_socket(self._context, zmq.PULL, ctrl.tokenizer_ipc, bind=True)
        self.balancer = LoadBalancer(server_args.load_balance_method, n)
        self._owner: dict[str, tuple[int, int]] = {}  # rid -> (replica, its tokens)
        # A request must fit the smallest replica's KV cache.
        self.max_total_num_tokens = min(i.max_total_num_tokens
                                        for i in self._ask_all(GetServerInfoReq()))
        self._validator = RequestValidator(self.model_limits())

    # --- the Scheduler interface ---------------------------------------------------

    def model_limits(self) -> ModelLimits:
        """The model's limits with the smallest replica's KV cache: callers validate
        against these (request_validation.py), so bad requests fail before routing."""
        return limits_from(self.model_config, self.max_total_num_tokens)

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        if not self._validator.is_well_formed(recv):
            # Replica 0's scheduler answers it with the 400 (or drops it, rid-less).
            if isinstance(getattr(recv, "rid", None), str):
                self._owner.setdefault(recv.rid, (0, 0))
                self._to_replica[0].send_pyobj(recv)
            return
        max_new = recv.sampling_params.max_new_tokens or 0
        if recv.data_parallel_rank is not None:  # the client chose (checked < dp_size)
            replica = self.balancer.assign(recv.data_parallel_rank,
                                           len(recv.input_ids) + max_new)
        else:
            replica = self.balancer.pick(recv.input_ids, max_new)
        self._owner[recv.rid] = (replica, len(recv.input_ids) + max_new)
        self._to_replica[replica].send_pyobj(recv)

    def abort_request(self, rid: str) -> None:
        owner = self._owner.get(rid)
        if owner is not None:
            self._to_replica[owner[0]].send_pyobj(AbortReq(rid))

    def has_work(self) -> bool:
        return bool(self._owner)

    def step(self) -> BatchTokenIDOut | None:
        """The replicas' outputs that arrived (briefly waiting for the first), merged."""
        outs: list[BatchTokenIDOut] = []
        timeout = _STEP_POLL_MS
        while self._outputs.poll(timeout):
            msg = self._outputs.recv_pyobj()
            timeout = 0
            if isinstance(msg, BatchTokenIDOut):  # stop strings were registered upstream
                self._account(msg)
                outs.append(msg)
        if not outs:
            self._check_alive()
            return None
        return outs[0] if len(outs) == 1 else _merge(outs)

    def flush_cache(self) -> bool:
        return all(r.success for r in self._ask_all(FlushCacheReq()))

    def expert_distribution(self, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
        """Every DP-attention rank's record, summed here (each answers alone)."""
        return merge_records(self._ask_all(ExpertDistributionReq(req.action, False)))

    def get_server_info(self) -> ServerInfo:
        """The replicas' counters summed; `extra["dp_replicas"]` lists each by rank."""
        infos = sorted(self._ask_all(GetServerInfoReq()),
                       key=lambda i: i.extra.get("dp_rank", 0))
        summed = {f.name: sum(getattr(i, f.name) for i in infos)
                  for f in dataclasses.fields(ServerInfo) if f.name != "extra"}
        return ServerInfo(**summed, extra={"dp_replicas": [dataclasses.asdict(i) for i in infos],
                                           "dp_load": list(self.balancer.load)})

    def shutdown(self) -> None:
        stop_processes(list(self._processes.values()))
        self._processes = {}
        if not self._context.closed:
            self._context.destroy(linger=0)
            self._ctrl.cleanup()

    # --- internals ------------------------------------------------------------------

    def _account(self, out: BatchTokenIDOut) -> None:
        for rid, reason in zip(out.rids, out.finished_reasons):
            if reason is not None:
                owner = self._owner.pop(rid, None)
                if owner is not None:
                    self.balancer.finished(*owner)

    def _ask_all(self, msg: object) -> list[Any]:
        """Send `msg` to every replica; their replies (order does not matter here)."""
        for sock in self._to_replica:
            sock.send_pyobj(msg)
        replies = []
        waited = 0.0
        while len(replies) < len(self._to_replica):
            if self._replies.poll(200):
                replies.append(self._replies.recv_pyobj())
                continue
            self._check_alive()
            waited += 0.2
            if waited > _REPLY_TIMEOUT_S:
                raise RuntimeError(f"replicas did not answer {type(msg).__name__} in "
                                   f"{_REPLY_TIMEOUT_S:.0f}s")
        return replies

    def _check_alive(self) -> None:
        dead = dead_process(self._processes)
        if dead is not None:
            logger.error("%s; stopping the other ranks", dead)
            self.shutdown()
            raise RuntimeError(f"{dead}; the engine is stopped")


def _merge(outs: list[BatchTokenIDOut]) -> BatchTokenIDOut:
    """One message with every entry of `outs`, in order (a rid may appear twice)."""
    return BatchTokenIDOut(*(sum((getattr(o, f.name) for o in outs), [])
                             for f in dataclasses.fields(BatchTokenIDOut)))


def run_dp_controller_process(server_args: ServerArgs, port_args: PortArgs, ctrl: PortArgs,
                              ready_pipe: Connection) -> None:
    """The API server's scheduler process when dp_size > 1: SchedulerLoop over the
    controller (the replicas are its siblings, started and watched by the server)."""
    from radixserve.managers.scheduler_process import serve_scheduler_loop, setup_worker_process

    setup_worker_process(server_args, "dp-controller")
    serve_scheduler_loop(lambda: DataParallelController(server_args, ctrl), port_args,
                         ready_pipe, "data parallel controller")


def launch_engine_replicas(server_args: ServerArgs) -> DataParallelController:
    """The Engine's parallel path: every rank of every replica in a process of its own,
    behind a controller in the caller's process."""
    from radixserve.managers.launcher import spawn_replica, wait_all_ready

    if server_args.node_rank > 0:
        raise ValueError("node_rank > 0 runs only TP followers: start it with "
                         "`python -m radixserve.launch_server ... --node-rank K`")
    ctrl = PortArgs.create()
    ranks = []
    try:
        for d in range(server_args.dp_size):
            ranks += spawn_replica(server_args, d, replica_port_args(ctrl, d))
        wait_all_ready(ranks)
        tokenizer = None
        if not server_args.skip_tokenizer_init:
            from radixserve.model_loader.tokenizer import get_tokenizer

            tokenizer = get_tokenizer(server_args.load_config())
        return DataParallelController(server_args, ctrl, tokenizer,
                                      {r.name: r.proc for r in ranks})
    except BaseException:
        stop_processes([r.proc for r in ranks])
        ctrl.cleanup()
        raise
