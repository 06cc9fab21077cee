"""TP and DP on two GPUs (NCCL): outputs equal the single-GPU run on a tiny float32 model.

    python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu/test_tp_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

TOP = 5


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (1, 7, 33, 130)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.model_factory import make_tiny_checkpoint

    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"),
                                    with_tokenizer=False))


def _generate(path: str, **kw: object) -> list[dict]:
    from radixserve.engine import Engine

    with Engine(path, skip_tokenizer_init=True, dtype="float32", max_total_tokens=16384,
                mem_fraction_static=0.5, cuda_graph_max_bs=8, **kw) as engine:
        return engine.generate(input_ids=_prompts(), return_logprob=True, top_logprobs_num=TOP,
                               sampling_params={"temperature": 0, "max_new_tokens": 32})


def _assert_same(ref: list[dict], got: list[dict]) -> None:
    for r, g in zip(ref, got):
        assert g["output_ids"] == r["output_ids"]
        for want, have in zip(r["meta_info"]["output_top_logprobs"],
                              g["meta_info"]["output_top_logprobs"]):
            assert max(abs(a[0] - b[0]) for a, b in zip(want, have)) < 1e-4


@pytest.fixture(scope="module")
def reference(checkpoint: str) -> list[dict]:
    return _generate(checkpoint)


def test_tp2_equals_tp1_float32(checkpoint: str, reference: list[dict]) -> None:
    # CUDA graphs on (decode batches up to 8 replay with NCCL all-reduces captured).
    _assert_same(reference, _generate(checkpoint, tp_size=2))


def test_tp2_eager_equals_tp1(checkpoint: str, reference: list[dict]) -> None:
    _assert_same(reference, _generate(checkpoint, tp_size=2, disable_cuda_graph=True))


def test_dp2_equals_dp1(checkpoint: str, reference: list[dict]) -> None:
    _assert_same(reference, _generate(checkpoint, dp_size=2,
                                      load_balance_method="shortest_queue"))


def test_tp2_symm_mem_equals_tp1(checkpoint: str, reference: list[dict]) -> None:
    # The same with the decode all-reduces through symmetric memory (one-shot).
    _assert_same(reference, _generate(checkpoint, tp_size=2, enable_symm_mem_all_reduce=True))


def test_tp2_nccl_window_equals_tp1(checkpoint: str, reference: list[dict]) -> None:
    # The same with the all-reduces through an NCCL symmetric window.
    _assert_same(reference, _generate(checkpoint, tp_size=2, enable_nccl_symm_all_reduce=True))


# [rows, cols] of the all-reduces checked below: decode-sized ones take the fast path;
# 17 x 1,001 (a length that is not whole 16-byte vectors: NCCL for the one-shot kernel,
# the window for NCCL's) and 600 x 4,096 bf16 (over the 4 MiB bound) fall back to NCCL.
_AR_SHAPES = [(1, 64), (3, 4096), (17, 1001), (256, 4096), (600, 4096)]


def _all_reduce_worker(rank: int, port: int, kind: str,
                       queue: "torch.multiprocessing.Queue") -> None:
    import torch.distributed as dist

    from radixserve.distributed.parallel_state import TpGroup

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                            rank=rank)
    group = TpGroup(rank, 2, dist.group.WORLD, None)
    report: dict[str, object] = {}
    for dtype in (torch.bfloat16, torch.float32):
        if kind == "one_shot":
            report[f"enabled {dtype}"] = group.enable_symm_mem_all_reduce(dtype, dev)
        elif dtype == torch.bfloat16:  # one window serves every dtype
            report["enabled"] = group.enable_nccl_window_all_reduce(dev)
        for rows, cols in _AR_SHAPES:
            group.begin_forward()  # each shape is a pass of its own, as in a model
            g = torch.Generator(device=dev).manual_seed(1000 * rank + rows)
            x = torch.randn(rows, cols, generator=g, device=dev).to(dtype)
            want = x.clone()
            dist.all_reduce(want)  # NCCL
            # Inside a CUDA graph too, replayed on new data, as the decode step runs it;
            # two calls, the first result read after the second (which reuses any
            # shared buffer). Doubling is exact, so the second sum is exactly 2 x want.
            static = torch.zeros_like(x)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                group.all_reduce(static.clone())
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                doubled = static * 2  # before the first call, which may sum in place
                out = group.all_reduce(static)
                out2 = group.all_reduce(doubled)
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            # Two addends: one rounding whatever the order, so the sums are bit-equal.
            report[f"{dtype} {rows}x{cols} eager"] = bool(torch.equal(group.all_reduce(x.clone()),
                                                                      want))
            report[f"{dtype} {rows}x{cols} graph"] = bool(torch.equal(out, want))
            report[f"{dtype} {rows}x{cols} graph 2nd"] = bool(torch.equal(out2, want * 2))
            # Written straight into the window, as a row-parallel layer does: summed there.
            target = group.all_reduce_buffer(tuple(x.shape), dtype)
            if target is not None:
                summed = group.all_reduce(target.copy_(x))
                report[f"{dtype} {rows}x{cols} in place"] = bool(
                    summed.data_ptr() == target.data_ptr() and torch.equal(summed, want))
    queue.put((rank, report))
    queue.close()
    queue.join_thread()  # the report is out
    # No destroy_process_group: on 2 x H200 (torch 2.11, NCCL 2.28) it never returned,
    # for either kind, and teardown is not what this test checks.
    os._exit(0)


@pytest.mark.parametrize("kind", ["one_shot", "nccl_window"])
def test_symm_mem_all_reduce_equals_nccl(kind: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, port, kind, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        reports = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, report in reports.items():
        assert all(report.values()), (rank, report)
