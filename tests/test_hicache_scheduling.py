"""HiCache under the scheduler's harder paths: several loads in one batch with the
device pool overcommitted, chunked and mixed prefills, and aborts at every stage (they
must free host and device alike)."""

from __future__ import annotations

import random

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from tests.abort_driver import run_with_random_aborts
from tests.test_hicache import DEVICE_TOKENS, GREEDY, assert_idle, model_path  # noqa: F401


@pytest.mark.parametrize("kwargs", [{}, {"chunked_prefill_size": 24, "enable_mixed_chunk": True}],
                         ids=["plain", "chunked-mixed"])
def test_batched_rounds_same_tokens(model_path, kwargs):
    """All conversations' turns at once: loads of several requests share one forward."""
    rng = random.Random(5)
    history = [[rng.randrange(3, 40000) for _ in range(30)] for _ in range(6)]
    engines = {on: Engine(model_path=model_path, max_total_tokens=DEVICE_TOKENS,
                          enable_hierarchical_cache=on, hicache_ratio=10, **kwargs)
               for on in (False, True)}
    for _ in range(3):
        prompts = [h + [rng.randrange(3, 40000) for _ in range(10)] for h in history]
        results = {on: [o["output_ids"] for o in eng.generate(input_ids=prompts,
                                                               sampling_params=GREEDY)]
                   for on, eng in engines.items()}
        assert results[True] == results[False]
        history = [p + o for p, o in zip(prompts, results[True])]
    assert engines[True].scheduler.kv.tree_cache.stats.host_hit_tokens > 0
    assert_idle(engines[True])
    for eng in engines.values():
        eng.shutdown()


def test_aborts_free_host_and_device(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=DEVICE_TOKENS, chunked_prefill_size=16,
                 enable_hierarchical_cache=True, hicache_ratio=10)
    sched = eng.scheduler
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 40000) for _ in range(120)] for _ in range(4)]
    for p in prefixes:  # each pushes the one before out of the device, into the host
        eng.generate(input_ids=p + [5], sampling_params=GREEDY)
    rids: list[str] = []
    to_abort: set[str] = set()
    for i in range(24):
        sp = SamplingParams(max_new_tokens=rng.randrange(1, 20), ignore_eos=True,
                            temperature=0)
        sp.verify()
        sp.normalize()
        ids = rng.choice(prefixes)[:rng.randrange(30, 121)] + [rng.randrange(3, 40000)
                                                               for _ in range(5)]
        sched.add_request(TokenizedGenerateReqInput(f"r{i}", None, ids, sp))
        rids.append(f"r{i}")
        to_abort.add(f"r{i}")
    finished = run_with_random_aborts(sched, rng, to_abort, 3, 5000)
    assert set(finished) == set(rids)
    assert any(r["type"] == "abort" for r in finished.values())
    assert sched.kv.tree_cache.stats.host_hit_tokens > 0
    assert_idle(eng)
    eng.shutdown()
