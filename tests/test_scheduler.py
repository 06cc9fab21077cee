"""Scheduling: radix reuse, chunked prefill, mixed batches, retraction and aborts.

Every configuration must give the same greedy tokens as the plain one.
"""

from __future__ import annotations

import random

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from tests.abort_driver import run_with_random_aborts
from tests.model_factory import make_tiny_checkpoint

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")))


def shared_prefix_batch(seed: int = 0, groups: int = 3, per_group: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    batch = []
    for _ in range(groups):
        prefix = [rng.randrange(3, 40000) for _ in range(rng.randrange(20, 60))]
        for _ in range(per_group):
            batch.append(prefix + [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 25))])
    return batch


@pytest.fixture(scope="module")
def reference(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=16384, disable_radix_cache=True,
                 chunked_prefill_size=-1)
    prompts = shared_prefix_batch()
    outs = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=GREEDY)]
    eng.shutdown()
    return prompts, outs


def assert_no_leak(engine: Engine) -> None:
    info = engine.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.protected_tokens == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


@pytest.mark.parametrize("kwargs", [
    {},
    {"chunked_prefill_size": 1},
    {"chunked_prefill_size": 7},
    {"chunked_prefill_size": 64},
    {"chunked_prefill_size": 7, "disable_radix_cache": True},
    {"chunked_prefill_size": 7, "enable_mixed_chunk": True},
    {"page_size": 4},
    {"page_size": 4, "chunked_prefill_size": 8},
    {"schedule_policy": "lpm"},
    {"schedule_policy": "dfs-weight", "page_size": 2},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "radix")
def test_same_tokens_in_every_configuration(model_path, reference, kwargs):
    prompts, expected = reference
    eng = Engine(model_path=model_path, max_total_tokens=16384, **kwargs)
    outs = eng.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == expected
    assert_no_leak(eng)
    eng.shutdown()


def test_prefix_reuse_is_real(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=16384)
    rng = random.Random(1)
    shared = [rng.randrange(3, 40000) for _ in range(200)]
    first = eng.generate(input_ids=shared + [11, 12, 13], sampling_params=GREEDY)
    before = eng.get_server_info().total_prefill_tokens
    second = eng.generate(input_ids=shared + [21, 22], sampling_params=GREEDY)
    computed = eng.get_server_info().total_prefill_tokens - before
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= 200
    assert computed == 202 - second["meta_info"]["cached_tokens"]
    assert computed <= 2
    # Turning reuse off gives the same tokens with nothing cached.
    off = Engine(model_path=model_path, max_total_tokens=16384, disable_radix_cache=True)
    again = off.generate(input_ids=shared + [21, 22], sampling_params=GREEDY)
    assert again["output_ids"] == second["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 0
    assert_no_leak(eng)
    assert_no_leak(off)


@pytest.mark.parametrize("page_size", [1, 4])
def test_memory_pressure_retracts_and_completes(model_path, page_size):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 40000) for _ in range(rng.randrange(8, 40))] for _ in range(64)]
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    big = Engine(model_path=model_path, max_total_tokens=16384, page_size=page_size)
    expected = [o["output_ids"] for o in big.generate(input_ids=prompts, sampling_params=params)]
    # 64 requests need ~64 * (24 + 48) ≈ 4.6k tokens; give them a tenth of that.
    small = Engine(model_path=model_path, max_total_tokens=512, page_size=page_size)
    outs = small.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == expected
    assert small.get_server_info().num_retractions >= 1
    assert_no_leak(small)


def test_random_aborts_free_everything(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=1024, chunked_prefill_size=16)
    sched = eng.scheduler
    rng = random.Random(3)
    rids = []
    for i in range(100):
        sp = SamplingParams(max_new_tokens=rng.randrange(1, 30), ignore_eos=True, temperature=0)
        sp.verify()
        sp.normalize()
        ids = [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 60))]
        sched.add_request(TokenizedGenerateReqInput(f"r{i}", None, ids, sp))
        rids.append(f"r{i}")
    finished = run_with_random_aborts(sched, rng, set(rng.sample(rids, 100)), 4, 5000)
    assert set(finished) == set(rids)
    assert any(r["type"] == "abort" for r in finished.values())
    assert_no_leak(eng)


def test_in_batch_prefix_sharing_reaches_the_optimum(model_path):
    """Requests that share an uncached prefix and arrive together compute it once."""
    from radixserve.bench.offline_throughput import shared_prefix_workload

    prompts, outs, must_compute = shared_prefix_workload(3, 4, 64, 8, 4, 40000, seed=0)
    eng = Engine(model_path=model_path, max_total_tokens=16384)
    results = eng.generate(input_ids=prompts, sampling_params=[
        {"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for o in outs])
    assert eng.get_server_info().total_prefill_tokens == must_compute
    cached = sum(r["meta_info"]["cached_tokens"] for r in results)
    assert cached == sum(len(p) for p in prompts) - must_compute
    assert_no_leak(eng)


def test_duplicate_rid_is_rejected_without_touching_the_original(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=4096)
    sched = eng.scheduler
    sp = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    sp.verify()
    sp.normalize()
    sched.add_request(TokenizedGenerateReqInput("dup", None, [5, 6, 7], sp))
    sched.step()  # the original is prefilled and running
    sched.add_request(TokenizedGenerateReqInput("dup", None, [8, 9], sp))
    out = sched.step()
    assert out is not None and out.finished_reasons[0]["status_code"] == 400
    # The rid still names the original: aborting it must reach it.
    sched.abort_request("dup")
    reasons = []
    while sched.has_work():
        out = sched.step()
        if out is not None:
            reasons += [r for r in out.finished_reasons if r is not None]
    assert reasons == [{"type": "abort", "message": "aborted by the client"}]
    assert_no_leak(eng)


def test_in_batch_prefix_sharing_with_chunked_prompts(model_path):
    """A leader's prompt split over chunks shares its prefix with the followers behind
    it: a follower whose cached part ends where a chunk ended must not compute the rest
    of the prefix while the leader computes it in the same batch."""
    from radixserve.bench.offline_throughput import shared_prefix_workload

    # 208-token prompts, chunks of 256: the third leader is split at token 96 and
    # finishes in the batch that reaches its followers.
    prompts, outs, must_compute = shared_prefix_workload(3, 4, 200, 8, 4, 40000, seed=0)
    params = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for o in outs]
    eng = Engine(model_path=model_path, max_total_tokens=16384, chunked_prefill_size=256)
    results = eng.generate(input_ids=prompts, sampling_params=params)
    assert eng.get_server_info().total_prefill_tokens == must_compute
    off = Engine(model_path=model_path, max_total_tokens=16384, disable_radix_cache=True,
                 chunked_prefill_size=256)
    expected = off.generate(input_ids=prompts, sampling_params=params)
    assert [r["output_ids"] for r in results] == [r["output_ids"] for r in expected]
    assert_no_leak(eng)
