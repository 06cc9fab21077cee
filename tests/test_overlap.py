"""The overlapped scheduler loop gives the same results as the plain one.

On CPU nothing runs asynchronously, but with enable_cpu_overlap the scheduler runs the
very same one-step-lagged loop as on CUDA: batch N+1 is built and launched before batch
N's tokens are folded back, with placeholders resolved from the future-token map.
"""

from __future__ import annotations

import random

import pytest

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from tests.model_factory import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama")))


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 40000) for _ in range(rng.randrange(1, 50))] for _ in range(n)]


def _params(n: int, seed: int, eos_stop: int | None = None) -> list[dict]:
    """Assorted requests: greedy, seeded sampling, penalties, min tokens, stop ids."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p: dict = {"max_new_tokens": rng.randrange(1, 24), "ignore_eos": True}
        kind = i % 5
        if kind == 0:
            p["temperature"] = 0
        elif kind == 1:
            p.update(temperature=0.9, top_p=0.9, seed=i)
        elif kind == 2:
            p.update(temperature=0, frequency_penalty=0.5, presence_penalty=0.3)
        elif kind == 3:
            p.update(temperature=0.7, top_k=20, seed=100 + i, min_new_tokens=2)
        elif eos_stop is not None:
            p.update(temperature=0, stop_token_ids=[eos_stop])
        out.append(p)
    return out


def _run(path: str, prompts, params, **kw) -> list[tuple]:
    eng = Engine(model_path=path, max_total_tokens=kw.pop("max_total_tokens", 8192), **kw)
    outs = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True,
                        top_logprobs_num=2)
    info = eng.get_server_info()
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
    return [(o["output_ids"], o["meta_info"]["finish_reason"],
             [lp for lp, _ in o["meta_info"]["output_token_logprobs"]]) for o in outs]


@pytest.mark.parametrize("kwargs", [
    {},
    {"chunked_prefill_size": 8},
    {"chunked_prefill_size": 8, "enable_mixed_chunk": True},
    {"page_size": 4},
    {"max_total_tokens": 400},  # retraction under memory pressure
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_overlap_matches_plain_loop(model_path, kwargs):
    prompts = _prompts(24, seed=1)
    # A stop id that the greedy requests actually hit, so some finish early (one step
    # late in the overlapped loop, which must not leak an extra token).
    probe = Engine(model_path=model_path, max_total_tokens=8192).generate(
        input_ids=prompts[4], sampling_params={"temperature": 0, "max_new_tokens": 6,
                                               "ignore_eos": True})["output_ids"]
    params = _params(24, seed=2, eos_stop=probe[2])
    plain = _run(model_path, prompts, params, **kwargs)
    overlapped = _run(model_path, prompts, params, enable_cpu_overlap=True, **kwargs)
    assert [r[:2] for r in overlapped] == [r[:2] for r in plain]
    # Logprobs: equal up to float noise (batch composition may differ by a late finisher).
    for a, b in zip(overlapped, plain):
        assert a[2] == pytest.approx(b[2], abs=1e-4)
    assert any(r[1]["type"] == "stop" for r in plain)


def test_overlap_aborts_and_late_finishes_free_everything(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=1024, chunked_prefill_size=16,
                 enable_cpu_overlap=True)
    sched = eng.scheduler
    assert sched.overlap
    rng = random.Random(7)
    rids = [f"o{i}" for i in range(60)]
    for rid in rids:
        sp = SamplingParams(max_new_tokens=rng.randrange(1, 20), temperature=0,
                            ignore_eos=True)
        sp.verify()
        sp.normalize()
        ids = [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 40))]
        sched.add_request(TokenizedGenerateReqInput(rid, None, ids, sp))
    done: dict[str, tuple] = {}
    pending_aborts = set(rng.sample(rids, 30))
    while sched.has_work():
        out = sched.step()
        if out is not None:
            for rid, ids, reason, n in zip(out.rids, out.new_output_ids, out.finished_reasons,
                                           out.completion_tokens):
                assert all(t >= 0 for t in ids), "a placeholder escaped to the output"
                if reason is not None:
                    done[rid] = (reason, n)
        for rid in rng.sample(sorted(pending_aborts), min(2, len(pending_aborts))):
            sched.abort_request(rid)
            pending_aborts.discard(rid)
    assert set(done) == set(rids)
    for reason, n in done.values():
        if reason["type"] == "length":
            assert n == reason["length"]
    info = eng.get_server_info()
    assert info.num_running_reqs == 0 and info.protected_tokens == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
