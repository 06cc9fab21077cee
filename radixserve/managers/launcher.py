"""Starting the rank processes of TP/DP replicas on this node.

Each replica is one TP world with its own rendezvous address. Rank 0 of a replica runs
`run_scheduler_process` (it owns the ZMQ sockets); ranks > 0 run
`run_tp_follower_process`. All are spawned (never forked: CUDA) by the launcher
(the API server's main process or the Engine), which watches them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from radixserve.managers.ipc import PortArgs
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0


@dataclass
class RankProcess:
    name: str
    proc: BaseProcess
    ready: Connection


def replica_port_args(ctrl: PortArgs, dp_rank: int) -> PortArgs:
    """Replica `dp_rank` listens on its own input socket and sends its outputs and replies
    to the controller's sockets (shared by all replicas)."""
    return PortArgs(ctrl.ipc_dir, ctrl.tokenizer_ipc,
                    f"ipc://{ctrl.ipc_dir}/replica{dp_rank}", ctrl.detokenizer_ipc)


def local_tp_ranks(server_args: ServerArgs) -> range:
    per_node = server_args.tp_size // server_args.nnodes
    return range(server_args.node_rank * per_node, (server_args.node_rank + 1) * per_node)


def dist_addr_for(server_args: ServerArgs, dp_rank: int) -> str:
    """host:port of replica `dp_rank`'s rendezvous: --dist-init-addr's port + dp_rank, or a
    free local port (one machine)."""
    if server_args.dist_init_addr:
        host, port = server_args.dist_init_addr.rsplit(":", 1)
        return f"{host}:{int(port) + dp_rank}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# The one rendezvous address of each DP-attention launch, by ServerArgs (kept alive
# with it, so the id stays its own).
_DP_ATTENTION_ADDRS: dict[int, tuple[ServerArgs, str]] = {}


def dp_attention_addr(server_args: ServerArgs) -> str:
    """host:port of the DP-attention world that all dp_size ranks join: --dist-init-addr,
    or a free local port chosen once per launch."""
    key = id(server_args)
    if key not in _DP_ATTENTION_ADDRS:
        _DP_ATTENTION_ADDRS[key] = (server_args, dist_addr_for(server_args, 0))
    return _DP_ATTENTION_ADDRS[key][1]


def rank_name(server_args: ServerArgs, dp_rank: int, tp_rank: int) -> str:
    if server_args.tp_size == 1 and server_args.dp_size == 1:
        return "scheduler"
    return f"scheduler (DP replica {dp_rank}, TP rank {tp_rank})"


def spawn_replica(server_args: ServerArgs, dp_rank: int,
                  port_args: PortArgs | None) -> list[RankProcess]:
    """Start this node's ranks of one replica (rank 0 only if it lives here)."""
    from radixserve.managers.scheduler_process import (run_scheduler_process,
                                                       run_tp_follower_process)

    ctx = mp.get_context("spawn")
    addr = dist_addr_for(server_args, dp_rank) if server_args.tp_size > 1 else None
    ranks = local_tp_ranks(server_args)
    if server_args.enable_dp_attention:
        # Replica d is rank d of one DP-attention world (managers/dp_attention.py).
        addr, ranks = dp_attention_addr(server_args), range(1)
    out = []
    for tp_rank in ranks:
        reader, writer = ctx.Pipe(duplex=False)
        if tp_rank == 0:
            target: Any = run_scheduler_process
            args: tuple = (server_args, port_args, writer, dp_rank, addr)
        else:
            target, args = run_tp_follower_process, (server_args, tp_rank, dp_rank, addr, writer)
        proc = ctx.Process(target=target, args=args, daemon=True,
                           name=f"radixserve-dp{dp_rank}-tp{tp_rank}")
        proc.start()
        writer.close()
        out.append(RankProcess(rank_name(server_args, dp_rank, tp_rank), proc, reader))
    return out


def wait_all_ready(ranks: list[RankProcess], timeout_s: float = _READY_TIMEOUT_S
                   ) -> list[dict[str, Any]]:
    """Each rank's ready message, in order; raises naming the first rank that exits or
    fails (a rank stuck in the rendezvous waits for the others, so check them all)."""
    replies: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(replies) < len(ranks):
        for i, r in enumerate(ranks):
            if i in replies:
                continue
            if r.ready.poll():
                reply = r.ready.recv()
                if reply.get("status") != "ready":
                    raise RuntimeError(f"{r.name} failed to start: {reply.get('message')}")
                replies[i] = reply
            elif not r.proc.is_alive():
                raise RuntimeError(f"{r.name} exited with code {r.proc.exitcode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"ranks not ready after {timeout_s:.0f}s")
        time.sleep(0.1)
    return [replies[i] for i in range(len(ranks))]


def stop_processes(procs: list[BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def dead_process(procs: dict[str, BaseProcess]) -> str | None:
    """A line naming every process that exited (the first cause and the ranks it took
    down with it), or None."""
    dead = [f"{name} (pid {p.pid}) exited with code {p.exitcode}"
            for name, p in procs.items() if not p.is_alive()]
    return "; ".join(dead) or None


def serve_followers(server_args: ServerArgs) -> int:
    """`launch_server --node-rank K` (K > 0): run this node's TP ranks until one exits
    (rank 0's node stopping ends them all); 1 if any rank failed."""
    ranks = spawn_replica(server_args, 0, None)
    procs = {r.name: r.proc for r in ranks}
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        wait_all_ready(ranks)
        logger.info("node %d: TP ranks %s ready, joined %s", server_args.node_rank,
                    list(local_tp_ranks(server_args)), server_args.dist_init_addr)
        while (dead := dead_process(procs)) is None:
            time.sleep(0.5)
        logger.error("%s; stopping this node's other ranks", dead)
        return 0 if all(p.exitcode == 0 for p in procs.values() if not p.is_alive()) else 1
    finally:
        stop_processes(list(procs.values()))


def _exit_on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def run_on_tp_ranks(target: Callable[..., None], server_args: ServerArgs, *args: Any) -> None:
    """Run `target(server_args, *args)` on every TP rank of one replica on this machine:
    rank 0 in this process, the others spawned (for tools that drive a ModelRunner
    directly, such as bench.one_batch). `target` must issue the same collectives on all
    ranks."""
    from radixserve.distributed.parallel_state import destroy_tp_group, init_tp_group

    ctx = mp.get_context("spawn")
    addr = dist_addr_for(server_args, 0)
    procs = [ctx.Process(target=_tp_rank_entry, args=(target, server_args, r, addr, args),
                         daemon=True, name=f"radixserve-tp{r}")
             for r in range(1, server_args.tp_size)]
    for p in procs:
        p.start()
    try:
        init_tp_group(server_args.parallel_config(), 0, addr)
        target(server_args, *args)
        for p in procs:
            p.join()
        failed = [f"TP rank {r} exited with code {p.exitcode}"
                  for r, p in enumerate(procs, 1) if p.exitcode != 0]
        if failed:
            raise RuntimeError("; ".join(failed))
    finally:
        stop_processes(procs)
        destroy_tp_group()


def _tp_rank_entry(target: Callable[..., None], server_args: ServerArgs, tp_rank: int,
                   addr: str, args: tuple) -> None:
    from radixserve.distributed.parallel_state import init_tp_group

    init_tp_group(server_args.parallel_config(), tp_rank, addr)
    target(server_args, *args)
