"""Tensor and data parallelism on CPU (gloo): TP=2 against TP=1 on every dense
architecture, DP=2 against DP=1 (Engine and HTTP), a two-"node" launch over loopback,
and a killed rank ending in a clean error rather than a hang."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from radixserve.managers.data_parallel_controller import PREFIX_BLOCK, LoadBalancer
from tests.conftest import free_port, start_server
from tests.model_factory import ARCHS, make_tiny_checkpoint, tiny_config

PROMPTS = [[1, 5, 9, 200, 3000], [1, 7, 7, 7], [1, 42] * 20, [1, 42] * 20 + [8, 9]]
GREEDY = {"temperature": 0, "max_new_tokens": 6}
TOP = 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every dense arch, plus one with a single KV head (replicated on both ranks)."""
    root = tmp_path_factory.mktemp("parallel")
    out = {arch: make_tiny_checkpoint(arch, root / arch, with_tokenizer=arch == "llama")
           for arch in ARCHS}
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_key_value_heads = 1
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama-mqa")
    out["llama-mqa"] = root / "llama-mqa"
    return out


@functools.cache
def _reference(path: Path) -> list[dict[str, Any]]:
    from radixserve.engine import Engine

    with Engine(str(path), skip_tokenizer_init=True, log_level="warning") as engine:
        return engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                               top_logprobs_num=TOP)


LOGPROB_TOL = 1e-4


def _assert_same_top(want: list[tuple[float, int]], got: list[tuple[float, int]]) -> None:
    """One step's top-k agree: the k values within LOGPROB_TOL position by position, each
    token's logprob within it wherever both lists hold the token, and the same tokens,
    except that two tokens whose logprobs tie within the tolerance may trade places (a
    different reduction order at TP=2 breaks a tie the other way) or trade the last slot."""
    assert len(want) == len(got)
    assert max(abs(a - b) for (a, _), (b, _) in zip(want, got)) < LOGPROB_TOL
    want_by_tok, got_by_tok = {t: v for v, t in want}, {t: v for v, t in got}
    for tok in want_by_tok.keys() & got_by_tok.keys():
        assert abs(want_by_tok[tok] - got_by_tok[tok]) < LOGPROB_TOL, tok
    for i, ((wv, wt), (_, gt)) in enumerate(zip(want, got)):
        if wt != gt:  # a swap is allowed only between tied neighbours
            tied = [t for v, t in want if abs(v - wv) < 2 * LOGPROB_TOL]
            assert gt in tied or i == len(want) - 1 and gt not in want_by_tok, (i, want, got)
    for tok in want_by_tok.keys() ^ got_by_tok.keys():  # only the k-th slot's tie
        assert abs(want_by_tok.get(tok, got_by_tok.get(tok)) - want[-1][0]) < 2 * LOGPROB_TOL


def test_top_k_comparison_allows_only_tied_swaps() -> None:
    want = [(-1.0, 7), (-2.0, 3), (-2.00001, 9), (-3.0, 4)]
    _assert_same_top(want, [(-1.0, 7), (-2.00001, 9), (-2.0, 3), (-3.0, 4)])
    _assert_same_top(want, [(-1.0, 7), (-2.0, 3), (-2.00001, 9), (-3.00001, 5)])
    for wrong in ([(-1.0, 3), (-2.0, 7), (-2.00001, 9), (-3.0, 4)],   # untied swap
                  [(-1.0, 7), (-2.0, 3), (-2.00001, 9), (-3.1, 4)],   # a value moved
                  [(-1.0, 7), (-2.0, 3), (-2.00001, 5), (-3.0, 4)]):  # another token
        with pytest.raises(AssertionError):
            _assert_same_top(want, wrong)


def _assert_same(ref: list[dict[str, Any]], ids: list[list[int]],
                 tops: list[list[list[tuple[float, int]]]]) -> None:
    for r, got_ids, got_tops in zip(ref, ids, tops):
        assert got_ids == r["output_ids"]
        assert len(got_tops) == len(r["meta_info"]["output_top_logprobs"])
        for want_step, got_step in zip(r["meta_info"]["output_top_logprobs"], got_tops):
            _assert_same_top(want_step, got_step)


# --- TP: the schedulers of two ranks in lockstep, one model after another -----------

def _tp_rank_main(rank: int, addr: str, paths: dict[str, str], results: Any) -> None:
    """Both ranks load each model; rank 0 drives requests through TpScheduler."""
    from radixserve.core.sampling_params import SamplingParams
    from radixserve.distributed.parallel_state import init_tp_group
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.scheduler import Scheduler
    from radixserve.managers.tp_sync import TpScheduler, run_follower_loop
    from radixserve.server_args import ServerArgs

    group = None
    for name, path in paths.items():
        sa = ServerArgs(model_path=path, tp_size=2, skip_tokenizer_init=True,
                        dist_timeout=60, log_level="warning")
        group = group or init_tp_group(sa.parallel_config(), rank, addr)
        scheduler = Scheduler(sa)
        if rank:
            run_follower_loop(scheduler, group)
            continue
        tp = TpScheduler(scheduler, group)
        for i, ids in enumerate(PROMPTS):
            sp = SamplingParams(**GREEDY)
            sp.normalize()
            tp.add_request(TokenizedGenerateReqInput(f"r{i}", None, ids, sp, True, -1, TOP))
        ids_out: dict[str, list[int]] = {}
        tops: dict[str, list] = {}
        while tp.has_work():
            out = tp.step()
            for j, rid in enumerate(out.rids if out else []):
                ids_out.setdefault(rid, []).extend(out.new_output_ids[j])
                tops.setdefault(rid, []).extend(out.output_top_logprobs[j])
        assert tp.flush_cache()
        tp.shutdown()
        rids = [f"r{i}" for i in range(len(PROMPTS))]
        results.put((name, [ids_out[r] for r in rids], [tops[r] for r in rids]))


def assert_tp2_matches_tp1(checkpoints: dict[str, Path], timeout_s: float) -> None:
    """Two spawned gloo ranks serve every checkpoint at TP=2 while this process computes
    TP=1's reference; tokens and top logprobs must agree (shared with test_quant_tp)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    paths = {k: str(v) for k, v in checkpoints.items()}
    procs = [ctx.Process(target=_tp_rank_main, args=(r, addr, paths, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    refs = {name: _reference(path) for name, path in checkpoints.items()}
    try:
        for _ in paths:
            name, ids, tops = results.get(timeout=timeout_s)
            _assert_same(refs[name], ids, tops)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_tp2_matches_tp1_on_every_dense_arch(checkpoints: dict[str, Path]) -> None:
    assert_tp2_matches_tp1(checkpoints, timeout_s=120)


def _agree_rank_main(rank: int, addr: str, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from radixserve.distributed.parallel_state import TpGroup

    dist.init_process_group("gloo", init_method=f"tcp://{addr}", world_size=2, rank=rank)
    group = TpGroup(rank, 2, dist.group.WORLD, dist.new_group(backend="gloo"))
    # The fast all-reduce paths are CUDA-only: on CPU both decline, on every rank alike.
    declined = not (group.enable_nccl_window_all_reduce(torch.device("cpu"))
                    or group.enable_symm_mem_all_reduce(torch.float32, torch.device("cpu")))
    # Rank 1's fast path failed where rank 0's worked: both must fall back to NCCL.
    group.symm_buffer, group.symm_kind = torch.zeros(8), "nccl_window"
    agreed = group._all_agree(rank == 0)
    results.put((rank, declined, agreed, group.symm_buffer is None, group.symm_kind))
    dist.destroy_process_group()


def _on_two_ranks(target: Any) -> list[Any]:
    """Run target(rank, addr, results) on two spawned ranks; what each put, by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=target, args=(r, addr, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return sorted((results.get(timeout=120) for _ in procs), key=lambda got: got[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_fast_all_reduce_paths_fall_back_together() -> None:
    got = _on_two_ranks(_agree_rank_main)
    assert got == [(0, True, False, True, ""), (1, True, False, True, "")]


def _window_rank_main(rank: int, addr: str, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from radixserve.distributed import parallel_state
    from radixserve.distributed.parallel_state import TpGroup
    from radixserve.layers.linear import RowParallelLinear

    dist.init_process_group("gloo", init_method=f"tcp://{addr}", world_size=2, rank=rank)
    group = TpGroup(rank, 2, dist.group.WORLD, None)
    # A CPU tensor stands in for the NCCL window: the slot bookkeeping is the same.
    window = torch.zeros(2048, dtype=torch.uint8)
    group.symm_buffer, group.symm_kind = window, "nccl_window"
    parallel_state._TP = group
    start = window.data_ptr()
    got: dict[str, bool] = {}
    a = group.all_reduce(torch.full((4,), rank + 1.0))
    b = group.all_reduce(torch.full((4,), 10.0 * (rank + 1)))
    got["first result at the window's start"] = a.data_ptr() == start
    got["second in a slot of its own"] = b.data_ptr() == start + 128
    got["both sums hold"] = bool((a == 3).all() and (b == 30).all())
    target = group.all_reduce_buffer((2, 8), torch.float32)
    target.fill_(rank + 1)
    summed = group.all_reduce(target)
    got["a buffer from all_reduce_buffer is summed in place"] = (
        summed.data_ptr() == target.data_ptr() == start + 256 and bool((summed == 3).all()))
    big = torch.ones(600)  # 2,400 bytes: more than the window holds
    got["too large: plain all-reduce"] = group.all_reduce(big) is big and bool((big == 2).all())
    rest = [group.all_reduce(torch.ones(64)) for _ in range(8)]  # 256 bytes each
    inside = [r.data_ptr() != 0 and start <= r.data_ptr() < start + 2048 for r in rest]
    got["window full: the rest go plain"] = inside == [True] * 6 + [False] * 2
    got["earlier results untouched"] = bool((a == 3).all() and (b == 30).all())
    group.begin_forward()
    got["next pass starts at the window's start"] = (
        group.all_reduce(torch.ones(3)).data_ptr() == start)
    # A row-parallel layer through the window equals the unsplit product.
    torch.manual_seed(0)
    full_w, x_full = torch.randn(16, 32), torch.randn(3, 32)
    layer = RowParallelLinear(32, 16, tp_rank=rank, tp_size=2)
    layer.weight_loader(layer.weight, full_w)
    group.begin_forward()
    out = layer(x_full[:, rank * 16:(rank + 1) * 16].contiguous())
    got["row-parallel output in the window"] = out.data_ptr() == start
    got["row-parallel output right"] = torch.allclose(out, x_full @ full_w.t(), atol=1e-5)
    results.put((rank, got))
    dist.destroy_process_group()


def test_all_reduces_take_their_own_window_slots() -> None:
    """The NCCL window's bookkeeping (on gloo, with a CPU tensor for the window): each
    all-reduce of a pass gets its own slot, so earlier sums stay readable; a row-parallel
    layer writes its product straight into the slot and it is summed there; what does
    not fit goes through the plain all-reduce; `begin_forward` starts over."""
    for rank, got in _on_two_ranks(_window_rank_main):
        assert all(got.values()), (rank, got)


# --- DP ----------------------------------------------------------------------------

def test_load_balancer_methods() -> None:
    rr = LoadBalancer("round_robin", 3)
    assert [rr.pick([1]) for _ in range(4)] == [0, 1, 2, 0]
    sq = LoadBalancer("shortest_queue", 2)
    assert [sq.pick([1]) for _ in range(4)] == [0, 1, 0, 1]
    sq.finished(1)
    sq.finished(1)
    assert sq.pick([1]) == 1
    mt = LoadBalancer("minimum_tokens", 2)
    # Outstanding prompt + max_new_tokens: 1,000 on replica 0 outweighs 3 x 200 on 1.
    assert [mt.pick([1] * 900, 100), mt.pick([1] * 100, 100), mt.pick([1] * 100, 100),
            mt.pick([1] * 100, 100), mt.pick([1] * 100, 100)] == [0, 1, 1, 1, 1]
    assert mt.tokens == [1000, 800]
    mt.finished(0, 1000)
    assert mt.tokens == [0, 800] and mt.pick([1], 1) == 0
    pa = LoadBalancer("prefix_affinity", 2)
    shared = list(range(2 * PREFIX_BLOCK))
    first = pa.pick(shared + [1])
    assert pa.pick(shared + [2]) == first  # same prefix: same replica, despite its load
    assert pa.pick([7] * PREFIX_BLOCK) != first  # new prefix: the shorter queue


def test_engine_dp2_matches_dp1(checkpoints: dict[str, Path]) -> None:
    from radixserve.engine import Engine

    ref = _reference(checkpoints["qwen3"])
    with Engine(str(checkpoints["qwen3"]), dp_size=2, skip_tokenizer_init=True,
                load_balance_method="prefix_affinity", log_level="warning") as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                              top_logprobs_num=TOP)
        info = engine.get_server_info()
    _assert_same(ref, [g["output_ids"] for g in got],
                 [g["meta_info"]["output_top_logprobs"] for g in got])
    per_replica = [r["total_prefill_tokens"] for r in info.extra["dp_replicas"]]
    assert all(per_replica), "both replicas served requests"
    assert info.extra["dp_load"] == [0, 0]


def _http_generate(url: str) -> list[dict[str, Any]]:
    body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
    return httpx2.post(f"{url}/generate", json=body, timeout=120).raise_for_status().json()


def test_server_dp2_matches_dp1(checkpoints: dict[str, Path]) -> None:
    ref = _reference(checkpoints["llama"])
    live = start_server("--model-path", str(checkpoints["llama"]), "--dp-size", "2",
                        "--skip-tokenizer-init",
                        "--load-balance-method", "shortest_queue", log_name="dp2")
    try:
        got = _http_generate(live.url)
        assert [g["output_ids"] for g in got] == [r["output_ids"] for r in ref]
        live.wait_idle()
    finally:
        live.proc.send_signal(signal.SIGTERM)
        assert live.proc.wait(timeout=30) == 0


# --- multi-node and failures --------------------------------------------------------

def test_two_nodes_over_loopback_then_node_loss(checkpoints: dict[str, Path]) -> None:
    """TP=2 as two nodes of one rank each; killing node 1 stops node 0's server."""
    ref = _reference(checkpoints["llama"])
    common = ["--model-path", str(checkpoints["llama"]), "--tp-size", "2", "--nnodes", "2",
              "--dist-init-addr", f"127.0.0.1:{free_port()}", "--dist-timeout", "60"]
    node1 = subprocess.Popen([sys.executable, "-m", "radixserve.launch_server", *common,
                              "--node-rank", "1", "--log-level", "warning"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # its own group: the whole "node"
    try:
        live = start_server(*common, "--node-rank", "0", log_name="node0")
    except BaseException:
        node1.kill()
        raise
    try:
        assert [g["output_ids"] for g in _http_generate(live.url)] == \
            [r["output_ids"] for r in ref]
        os.killpg(node1.pid, signal.SIGKILL)
        node1.wait(timeout=10)
        # The next step's broadcast finds the peer gone: an error, then the server exits.
        resp = httpx2.post(f"{live.url}/generate", timeout=60,
                           json={"input_ids": [1, 2, 3], "sampling_params": GREEDY})
        assert resp.status_code >= 500
        assert live.proc.wait(timeout=30) == 1
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
    port = live.url.rsplit(":", 1)[1]
    log = Path(os.environ.get("TMPDIR", "/tmp"), f"radixserve-test-node0-{port}.log").read_text()
    assert "scheduler (DP replica 0, TP rank 0) process" in log and "shutting down" in log
    assert "lost its group" in log


def test_killed_rank_fails_engine_cleanly(checkpoints: dict[str, Path]) -> None:
    from radixserve.engine import Engine

    engine = Engine(str(checkpoints["llama"]), tp_size=2, skip_tokenizer_init=True,
                    log_level="warning")
    try:
        assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]
        follower = engine.scheduler._processes["scheduler (DP replica 0, TP rank 1)"]
        os.kill(follower.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"TP rank 1\) \(pid \d+\) exited with code -9"):
            engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)
        assert time.monotonic() - start < 30
    finally:
        engine.shutdown()
