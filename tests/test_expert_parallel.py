"""Expert parallelism, DP-attention and EPLB on CPU (gloo, two spawned ranks) against
one rank without them, on the tiny Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and -V3
checkpoints: greedy tokens identical, top logprobs within 1e-4 (float32)."""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import free_port
from tests.moe_factory import MOE_ARCHS, make_tiny_moe_checkpoint, one_thread  # noqa: F401

PROMPTS = [[1, 5, 9, 200, 3000], [1, 7, 7, 7], [1, 42] * 20, [1, 42] * 20 + [8, 9]]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
TOP = 5
# DP-attention: rank 0 serves the first three prompts, rank 1 the last, for half as
# many tokens, so rank 1 runs out of work first and then steps with idle passes.
DP_SPLIT = {0: [0, 1, 2], 1: [3]}
DP_NEW_TOKENS = {0: GREEDY["max_new_tokens"], 1: GREEDY["max_new_tokens"] // 2}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ep")
    return {arch: make_tiny_moe_checkpoint(arch, root / arch, with_tokenizer=False)
            for arch in MOE_ARCHS}


@functools.cache
def _reference(path: Path, new_tokens: tuple[int, ...] | None = None, **kwargs: Any
               ) -> tuple[list[dict[str, Any]], Any]:
    """One rank, no expert parallelism: the outputs (each prompt's max_new_tokens from
    `new_tokens` if given), and the recorder's dump when `kwargs` turn it on."""
    from radixserve.engine import Engine

    params = ([{**GREEDY, "max_new_tokens": n} for n in new_tokens] if new_tokens
              else GREEDY)

    with Engine(str(path), skip_tokenizer_init=True, log_level="warning", **kwargs) as engine:
        experts = engine.scheduler.model_runner.experts
        if experts is not None:
            experts.start_record()
        outs = engine.generate(input_ids=PROMPTS, sampling_params=params, return_logprob=True,
                               top_logprobs_num=TOP)
        return outs, experts.dump_record() if experts is not None else None


def _assert_same(ref: list[dict[str, Any]], ids: list[list[int]],
                 tops: list[list[list[tuple[float, int]]]], what: str) -> None:
    for i, (r, got_ids, got_tops) in enumerate(zip(ref, ids, tops)):
        assert got_ids == r["output_ids"], f"{what}: prompt {i}"
        for want_step, got_step in zip(r["meta_info"]["output_top_logprobs"], got_tops):
            assert [t for _, t in want_step] == [t for _, t in got_step], what
            assert max(abs(a[0] - b[0]) for a, b in zip(want_step, got_step)) < 1e-4, what


def _request(i: int, max_new_tokens: int = GREEDY["max_new_tokens"]) -> Any:
    from radixserve.core.sampling_params import SamplingParams
    from radixserve.managers.io_struct import TokenizedGenerateReqInput

    sp = SamplingParams(**{**GREEDY, "max_new_tokens": max_new_tokens})
    sp.normalize()
    return TokenizedGenerateReqInput(f"r{i}", None, PROMPTS[i], sp, True, -1, TOP)


def _drive(front: Any, rids: list[str]) -> tuple[list[list[int]], list[list]]:
    ids: dict[str, list[int]] = {r: [] for r in rids}
    tops: dict[str, list] = {r: [] for r in rids}
    while front.has_work():
        out = front.step()
        for j, rid in enumerate(out.rids if out else []):
            ids[rid].extend(out.new_output_ids[j])
            tops[rid].extend(out.output_top_logprobs[j])
    return [ids[r] for r in rids], [tops[r] for r in rids]


def _placement_report(scheduler: Any) -> dict[str, Any]:
    experts = scheduler.model_runner.experts
    loc = experts.state.location
    trivial = torch.arange(loc.num_physical).remainder(loc.num_logical)
    moved = any(not torch.equal(loc.physical_to_logical[m.layer_id].cpu(), trivial)
                for m in experts.layers)
    return {"rebalances": experts.rebalances, "moved": moved}


# --- the ranks ---------------------------------------------------------------------

def _ep_tp_rank_main(rank: int, addr: str, paths: dict[str, str], kwargs: dict[str, Any],
                     results: Any) -> None:
    """EP inside TP: both ranks load each model; rank 0 drives every request."""
    torch.set_num_threads(1)
    from radixserve.distributed.parallel_state import init_tp_group
    from radixserve.managers.io_struct import ExpertDistributionReq
    from radixserve.managers.scheduler import Scheduler
    from radixserve.managers.tp_sync import TpScheduler, run_follower_loop
    from radixserve.server_args import ServerArgs

    group = None
    for name, path in paths.items():
        sa = ServerArgs(model_path=path, tp_size=2, ep_size=2, skip_tokenizer_init=True,
                        dist_timeout=60, log_level="warning", **kwargs)
        group = group or init_tp_group(sa.parallel_config(), rank, addr)
        scheduler = Scheduler(sa)
        if rank:
            run_follower_loop(scheduler, group)
            continue
        tp = TpScheduler(scheduler, group)
        recording = scheduler.model_runner.experts.state.recorder is not None
        if recording:
            assert tp.expert_distribution(ExpertDistributionReq("start")).success
        for i in range(len(PROMPTS)):
            tp.add_request(_request(i))
        ids, tops = _drive(tp, [f"r{i}" for i in range(len(PROMPTS))])
        # Summed over both ranks, each of which dispatched half of every batch.
        dump = (tp.expert_distribution(ExpertDistributionReq("dump")).record["logical_count"]
                if recording else None)
        tp.shutdown()
        results.put((name, ids, tops, _placement_report(scheduler), dump))


def _dp_attention_rank_main(rank: int, addr: str, paths: dict[str, str],
                            kwargs: dict[str, Any], results: Any) -> None:
    """DP-attention: each rank its own requests; both step together."""
    torch.set_num_threads(1)
    from radixserve.distributed.ep_group import init_dp_attention_group
    from radixserve.managers.dp_attention import DpAttentionScheduler
    from radixserve.managers.scheduler import Scheduler
    from radixserve.server_args import ServerArgs

    group = None
    for name, path in paths.items():
        sa = ServerArgs(model_path=path, tp_size=2, dp_size=2, ep_size=2,
                        enable_dp_attention=True, skip_tokenizer_init=True, dist_timeout=60,
                        log_level="warning", **kwargs)
        group = group or init_dp_attention_group(sa.parallel_config(), rank, addr)
        dp = DpAttentionScheduler(Scheduler(sa), group)
        experts = dp.scheduler.model_runner.experts
        if experts.state.recorder is not None:
            experts.start_record()
        for i in DP_SPLIT[rank]:
            dp.add_request(_request(i, DP_NEW_TOKENS[rank]))
        ids, tops = _drive(dp, [f"r{i}" for i in DP_SPLIT[rank]])
        # Plain lists: a tensor in a queue is shared memory that dies with this process.
        dump = (experts.dump_record()["logical_count"].tolist()
                if experts.state.recorder is not None else None)
        report = {**_placement_report(dp.scheduler), "idle_passes": dp.idle_passes}
        info = dp.scheduler.get_server_info()  # every KV slot back (free or cached)
        assert info.num_running_reqs == 0 and info.protected_tokens == 0
        assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
        results.put((name, rank, ids, tops, report, dump))


def _run_two_ranks(target: Any, paths: dict[str, Path], kwargs: dict[str, Any],
                   per_model: int, timeout_s: float = 300) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    str_paths = {k: str(v) for k, v in paths.items()}
    procs = [ctx.Process(target=target, args=(r, addr, str_paths, kwargs, results))
             for r in (0, 1)]
    for p in procs:
        p.start()
    got: list[tuple] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < per_model * len(paths):
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                # A rank that died leaves its peer waiting in a collective: fail now.
                dead = [p.exitcode for p in procs if not p.is_alive()]
                assert not any(dead) and time.monotonic() < deadline, (dead, len(got))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return got


# --- EP inside TP ------------------------------------------------------------------

def test_ep2_matches_one_rank(moe_checkpoints: dict[str, Path]) -> None:
    for name, ids, tops, _, _ in _run_two_ranks(_ep_tp_rank_main, moe_checkpoints, {}, 1):
        _assert_same(_reference(moe_checkpoints[name])[0], ids, tops, f"EP=2 {name}")


def test_ep2_eplb_rebalancing_changes_no_output(moe_checkpoints: dict[str, Path]) -> None:
    """Two redundant slots and a rebalance every 2 passes: weights move between the
    ranks mid-run (the placement ends up off the trivial one) and no output changes;
    the recorder's dump, summed over the ranks, counts what one rank counts."""
    kwargs = {"ep_num_redundant_experts": 2, "enable_eplb": True,
              "eplb_rebalance_num_iterations": 2, "expert_distribution_recorder_mode": "stat",
              "disable_radix_cache": True}
    paths = {k: moe_checkpoints[k] for k in ("qwen3-moe", "deepseek-v3")}
    for name, ids, tops, report, dump in _run_two_ranks(_ep_tp_rank_main, paths, kwargs, 1):
        assert report["rebalances"] >= 3 and report["moved"], (name, report)
        _assert_same(_reference(moe_checkpoints[name])[0], ids, tops, f"EPLB {name}")
        _, ref_dump = _reference(moe_checkpoints[name], disable_radix_cache=True,
                                 expert_distribution_recorder_mode="stat")
        assert dump == ref_dump["logical_count"].tolist(), name


# --- DP-attention ------------------------------------------------------------------

def _dp_reference(ref: list[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    """One rank's share of the reference, cut to that rank's max_new_tokens (greedy:
    a shorter run is a prefix of the longer one)."""
    n = DP_NEW_TOKENS[rank]
    return [{"output_ids": ref[i]["output_ids"][:n],
             "meta_info": {"output_top_logprobs": ref[i]["meta_info"]["output_top_logprobs"][:n]}}
            for i in DP_SPLIT[rank]]


def _dp_results(got: list[tuple]) -> dict[str, dict[int, tuple]]:
    by_model: dict[str, dict[int, tuple]] = {}
    for name, rank, ids, tops, report, dump in got:
        by_model.setdefault(name, {})[rank] = (ids, tops, report, dump)
    return by_model


def test_dp_attention_matches_one_rank(moe_checkpoints: dict[str, Path]) -> None:
    for name, ranks in _dp_results(_run_two_ranks(_dp_attention_rank_main, moe_checkpoints,
                                                  {}, 2)).items():
        ref = _reference(moe_checkpoints[name])[0]
        for rank, (ids, tops, report, _) in ranks.items():
            _assert_same(_dp_reference(ref, rank), ids, tops, f"DP-attn {name}")
        assert ranks[1][2]["idle_passes"] > 0  # rank 1 ran dry and idled with rank 0


def test_dp_attention_with_eplb_and_recorder(moe_checkpoints: dict[str, Path]) -> None:
    """Rebalancing under DP-attention changes no output, and the recorder's counts,
    summed over the ranks, equal one rank's over the same requests."""
    # No radix cache on either side: one rank would reuse prompt 2's KV for prompt 3's
    # shared prefix, which the two DP ranks cannot, and count fewer routed tokens.
    kwargs = {"ep_num_redundant_experts": 2, "enable_eplb": True,
              "eplb_rebalance_num_iterations": 3, "expert_distribution_recorder_mode": "stat",
              "disable_radix_cache": True}
    paths = {"deepseek-v2": moe_checkpoints["deepseek-v2"]}
    ranks = _dp_results(_run_two_ranks(_dp_attention_rank_main, paths, kwargs, 2))["deepseek-v2"]
    new_tokens = tuple(DP_NEW_TOKENS[r] for r in sorted(DP_SPLIT) for _ in DP_SPLIT[r])
    ref = _reference(paths["deepseek-v2"])[0]
    _, ref_dump = _reference(paths["deepseek-v2"], new_tokens, disable_radix_cache=True,
                             expert_distribution_recorder_mode="stat")
    for rank, (ids, tops, report, dump) in ranks.items():
        assert report["rebalances"] >= 2 and report["moved"], report
        _assert_same(_dp_reference(ref, rank), ids, tops, "DP-attn + EPLB")
        assert dump == ref_dump["logical_count"].tolist()
    assert ref_dump["logical_count"].sum() > 0


def test_engine_with_dp_attention(moe_checkpoints: dict[str, Path]) -> None:
    """The Engine's launch: one process per DP-attention rank behind the DP controller,
    which spreads the requests over both ranks; the outputs are one rank's, and every
    KV slot is back when it is done."""
    from radixserve.engine import Engine

    path = moe_checkpoints["deepseek-v3"]
    with Engine(str(path), skip_tokenizer_init=True, log_level="warning", tp_size=2,
                dp_size=2, ep_size=2, enable_dp_attention=True, disable_radix_cache=True,
                expert_distribution_recorder_mode="stat") as engine:
        engine.start_expert_distribution_record()
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                               top_logprobs_num=TOP)
        record = engine.dump_expert_distribution_record()
        info = engine.get_server_info()
    ref = _reference(path)[0]
    _, ref_dump = _reference(path, disable_radix_cache=True,
                             expert_distribution_recorder_mode="stat")
    # The controller summed the two ranks' records.
    assert record["logical_count"] == ref_dump["logical_count"].tolist()
    _assert_same(ref, [o["output_ids"] for o in outs],
                 [o["meta_info"]["output_top_logprobs"] for o in outs], "Engine DP-attn")
    assert info.num_running_reqs == 0 and info.protected_tokens == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
