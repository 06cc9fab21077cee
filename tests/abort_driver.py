"""Drive a Scheduler to idle while aborting requests at random moments (every stage:
waiting, mid-load, mid-prefill, decoding, finished), for the no-leak tests."""

from __future__ import annotations

import random
from typing import Any


def run_with_random_aborts(sched: Any, rng: random.Random, to_abort: set[str],
                           max_per_step: int, max_steps: int) -> dict[str, dict]:
    """Step until the scheduler has no work, aborting up to `max_per_step - 1` of
    `to_abort` after each step (the rest at the end); return each rid's finish reason."""
    finished: dict[str, dict] = {}
    to_abort = set(to_abort)
    steps = 0
    while sched.has_work():
        out = sched.step()
        steps += 1
        if out is not None:
            for rid, reason in zip(out.rids, out.finished_reasons):
                if reason is not None:
                    finished[rid] = reason
        for rid in rng.sample(sorted(to_abort), min(len(to_abort),
                                                    rng.randrange(0, max_per_step))):
            sched.abort_request(rid)
            to_abort.discard(rid)
        assert steps < max_steps, "the scheduler did not become idle"
    for rid in to_abort:  # finished before their turn: an abort now must be harmless
        sched.abort_request(rid)
    return finished
