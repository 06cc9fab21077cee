"""GPU idle time between consecutive decode steps and host time per scheduler step,
with the overlapped loop on and off.

    python -m radixserve.bench.overlap_timeline --model-path ../shared/model_configs/qwen3-0.6b \
        --load-format dummy --batch-size 64 256

For each batch size it fills the running batch, warms up, then records the device's
timeline over a window of decode steps, two ways:

* between steps (what the scheduler costs the device): a CUDA event recorded before
  each batch's first launch and one after its sampling; a step's gap is the time from
  the previous batch's end event to its start event, which is zero whenever the next
  batch was already queued when the device got there.
* all idle: the window minus the union of kernel and copy intervals (torch.profiler),
  which also counts the launch gaps between the kernels inside a step's CUDA graph.

Host time per step excludes waiting for the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
from collections.abc import Iterator
from typing import Any

import torch

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.server_args import ServerArgs


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


@contextlib.contextmanager
def _step_events(runner: Any) -> Iterator[list[tuple[str, torch.cuda.Event]]]:
    """Record a timing event before each batch's forward and after its sampling."""
    marks: list[tuple[str, torch.cuda.Event]] = []
    launch_forward, launch_sampling = runner.launch_forward, runner.launch_sampling

    def mark(kind: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((kind, event))

    def forward(batch: Any, *args: Any) -> Any:
        mark("start")
        return launch_forward(batch, *args)

    def sampling(pending: Any) -> None:
        launch_sampling(pending)
        mark("end")

    runner.launch_forward, runner.launch_sampling = forward, sampling
    try:
        yield marks
    finally:
        del runner.launch_forward, runner.launch_sampling


def measure(engine: Engine, bs: int, input_len: int, steps: int, seed: int) -> dict[str, Any]:
    sched = engine.scheduler
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    for i in range(bs):
        sp = SamplingParams(temperature=0, max_new_tokens=steps + 64, ignore_eos=True)
        sp.normalize()
        ids = [rng.randrange(10, vocab) for _ in range(input_len)]
        sched.add_request(TokenizedGenerateReqInput(f"t{bs}-{i}", None, ids, sp))
    while sched.waiting_queue or sched.chunked_req:  # prefill everything
        sched.step()
    for _ in range(16):  # warm decode
        sched.step()
    host = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, \
            _step_events(sched.model_runner) as marks:
        for _ in range(steps):
            sched.step()
            host.append(sched.last_step_host_s)
        torch.cuda.synchronize()
    # marks: start and end events of each batch in launch order; the gap before a batch
    # is from the end of the batch before it to its own start.
    ends = [e for kind, e in marks if kind == "end"]
    starts = [e for kind, e in marks if kind == "start"]
    between_ms = sum(max(0.0, end.elapsed_time(start)) for end, start in zip(ends, starts[1:]))
    intervals = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
    window = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = _busy_us(intervals)
    for rid in list(sched._rids):
        sched.abort_request(rid)
    while sched.has_work():
        sched.step()
    host.sort()
    step_ms = window / 1e3 / steps
    return dict(batch_size=bs, overlap=sched.overlap, step_ms=step_ms,
                tok_s=bs / step_ms * 1e3,
                between_steps_idle_frac=between_ms * 1e3 / window,
                between_steps_idle_ms_per_step=between_ms / max(1, len(starts) - 1),
                gpu_idle_frac=1 - busy / window,
                idle_ms_per_step=(window - busy) / 1e3 / steps,
                host_ms_median=statistics.median(host) * 1e3,
                host_ms_p99=host[int(0.99 * (len(host) - 1))] * 1e3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--result-file", default=None)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    args.skip_tokenizer_init = True
    base = vars(ServerArgs.from_cli_args(args))
    rows = []
    for overlap in (True, False):
        engine = Engine(**{**base, "disable_overlap_schedule": not overlap})
        for bs in args.batch_size:
            row = measure(engine, bs, args.input_len, args.steps, seed=bs)
            row["device"] = torch.cuda.get_device_name()
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.shutdown()
    print("\noverlap | batch | step ms | tok/s | idle between steps % | ms/step | "
          "all idle % | ms/step | host ms p50 | p99")
    for r in rows:
        print(f"{r['overlap']} | {r['batch_size']} | {r['step_ms']:.3f} | {r['tok_s']:.0f} | "
              f"{100 * r['between_steps_idle_frac']:.2f} | "
              f"{r['between_steps_idle_ms_per_step']:.3f} | "
              f"{100 * r['gpu_idle_frac']:.1f} | {r['idle_ms_per_step']:.3f} | "
              f"{r['host_ms_median']:.3f} | {r['host_ms_p99']:.3f}")
    if args.result_file:
        with open(args.result_file, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
