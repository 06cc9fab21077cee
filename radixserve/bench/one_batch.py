"""Static-batch latency: one prefill of `batch` requests, then decode steps.

    python -m radixserve.bench.one_batch --model-path ../shared/model_configs/qwen3-8b \
        --load-format dummy --batch-size 1 8 32 --input-len 128 --output-len 256 \
        --floor --compare-hf

Reports prefill latency and throughput, median decode step latency and throughput; with
--floor, the fraction of the memory floor (decode: the weights a step reads, for MoE only
the experts its tokens reach, plus the KV cache) and the compute ceiling (prefill)
measured on this GPU in the same run; with --compare-hf, HF transformers' `generate` on
the same shapes and the ratio. HF runs after ours, in the same process, once our runner
is gone: a 30B MoE does not fit on one GPU twice. `--hf-batch-size` and
`--hf-output-len` limit HF (slow) to some of the shapes and fewer tokens; the ratio
compares it with ours over the same tokens (our prefill plus as many decode steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from radixserve.bench.floor import decode_weight_bytes, measure_ceilings, model_flops_per_token
from radixserve.bench.hf_baseline import build_hf_model, free_device_memory
from radixserve.configs.model_config import ModelConfig
from radixserve.core.forward_batch import ForwardMode
from radixserve.core.req import Req
from radixserve.core.sampling_params import SamplingParams
from radixserve.core.schedule_batch import ScheduleBatch
from radixserve.distributed.parallel_state import get_tp_group
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.server_args import ServerArgs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_reqs(bs: int, input_len: int, vocab: int, seed: int) -> list[Req]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(bs):
        sp = SamplingParams(temperature=0, max_new_tokens=1 << 20, ignore_eos=True)
        sp.normalize()
        ids = torch.randint(0, vocab, (input_len,), generator=g).tolist()
        req = Req(f"b{i}", ids, sp)
        req.fill_ids = list(ids)
        reqs.append(req)
    return reqs


def _alloc(runner: ModelRunner, req: Req, n: int) -> torch.Tensor:
    cur = req.kv_committed_len
    last = int(runner.req_to_token_pool.read(req.req_pool_idx, cur)[-1]) if cur else -1
    slots = runner.token_to_kv_pool_allocator.alloc_for_seq(last, cur, n)
    if slots is None:
        raise RuntimeError("KV pool too small for this batch; lower --batch-size or lengths")
    runner.req_to_token_pool.write(req.req_pool_idx, cur, slots)
    return slots


def run_one(runner: ModelRunner, bs: int, input_len: int, output_len: int,
            seed: int = 0, max_prefill_tokens: int = 16384) -> dict[str, Any]:
    """Prefill + output_len - 1 decode steps; returns latencies in seconds."""
    dev = runner.device
    runner.req_to_token_pool.clear()
    runner.token_to_kv_pool_allocator.clear()
    reqs = _make_reqs(bs, input_len, runner.model_config.vocab_size, seed)
    for r in reqs:
        r.req_pool_idx = runner.req_to_token_pool.alloc()
    prefill = _prefill(runner, reqs, input_len, max_prefill_tokens)
    steps = []
    for _ in range(output_len - 1):
        for r in reqs:
            r.fill_ids = r.all_ids
        locs = torch.cat([_alloc(runner, r, 1) for r in reqs])
        batch = ScheduleBatch(reqs, ForwardMode.DECODE, out_cache_loc=locs)
        _sync(dev)
        t0 = time.perf_counter()
        res = runner.forward_batch_generation(batch)
        _sync(dev)
        steps.append(time.perf_counter() - t0)
        for r, tok in zip(reqs, res.next_token_ids):
            r.kv_committed_len += 1
            r.output_ids.append(tok)
    return {"prefill_s": prefill, "decode_steps_s": steps}


def _prefill(runner: ModelRunner, reqs: list[Req], input_len: int,
             max_prefill_tokens: int) -> float:
    """Prefill whole requests, at most --max-prefill-tokens per forward as the scheduler
    admits them (one forward of 256 x 512 tokens would need GBs of activations next to a
    30B MoE); returns the summed forward times."""
    dev = runner.device
    per_forward = max(1, max_prefill_tokens // input_len)
    total = 0.0
    for start in range(0, len(reqs), per_forward):
        group = reqs[start:start + per_forward]
        locs = torch.cat([_alloc(runner, r, input_len) for r in group])
        batch = ScheduleBatch(group, ForwardMode.EXTEND, out_cache_loc=locs)
        _sync(dev)
        t0 = time.perf_counter()
        res = runner.forward_batch_generation(batch)
        _sync(dev)
        total += time.perf_counter() - t0
        for r, tok in zip(group, res.next_token_ids):
            r.kv_committed_len = len(r.fill_ids)
            r.output_ids.append(tok)
    return total


def allreduce_step_s(runner: ModelRunner, bs: int, iters: int = 20) -> float:
    """Time of the all-reduces of one decode step alone (one after the embedding, two per
    layer, each of [bs, hidden]). On CUDA they are timed as a captured CUDA graph, as
    the decode step runs them (eager launches would add host cost the step does not
    pay); back to back they still include each call's barrier wait and fixed latency,
    so this is their share on the critical path. Every TP rank must call it."""
    mc = runner.model_config
    x = torch.randn(bs, mc.hidden_size, dtype=runner.dtype, device=runner.device)
    n = 2 * mc.num_hidden_layers + 1
    group = runner.tp_group

    def step() -> None:
        group.begin_forward()
        for _ in range(n):
            # As a row-parallel layer does: its product lands in the all-reduce's own
            # buffer where there is one (the values do not matter for the time).
            in_place = group.all_reduce_buffer(tuple(x.shape), x.dtype)
            group.all_reduce(x if in_place is None else in_place)

    run = step
    if runner.device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        run = graph.replay
    for _ in range(3):
        run()
    _sync(runner.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    _sync(runner.device)
    return (time.perf_counter() - t0) / iters


def hf_generate_tok_s(model: torch.nn.Module, device: str, bs: int, input_len: int,
                      output_len: int) -> float:
    """HF transformers `generate` (eager, dynamic cache, greedy): output tokens/s of one
    batch, prefill included."""
    ids = torch.randint(0, model.config.vocab_size, (bs, input_len), device=device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        _sync(torch.device(device))
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(torch.device(device))
    return bs * output_len / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[128])
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--compare-hf", action="store_true")
    parser.add_argument("--hf-batch-size", type=int, nargs="+", default=None,
                        help="run HF only at these of the batch sizes (default: all)")
    parser.add_argument("--hf-output-len", type=int, default=None,
                        help="HF generates this many tokens (default: --output-len)")
    parser.add_argument("--result-file", default=None, help="append JSON lines here")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    if args.skip_tokenizer_init is False:
        args.skip_tokenizer_init = True  # random token ids; no tokenizer needed
    sa = ServerArgs.from_cli_args(args)
    need = max(args.batch_size) * (max(args.input_len) + args.output_len)
    if sa.max_total_tokens is None and sa.device == "cpu":
        sa.max_total_tokens = need
    if sa.max_running_requests is None:
        sa.max_running_requests = max(args.batch_size)
    if sa.tp_size > 1:
        from radixserve.managers.launcher import run_on_tp_ranks

        run_on_tp_ranks(_bench, sa, args)  # every rank runs the same batches
    else:
        _bench(sa, args)


def _bench(sa: ServerArgs, args: argparse.Namespace) -> None:
    """The benchmark on this rank; only TP rank 0 reports."""
    lead = get_tp_group().rank == 0
    # Measured before the runner exists: the 2 GiB copy needs memory the KV pool takes.
    ceilings = measure_ceilings(torch.device(sa.device)) if args.floor and lead else None
    mc = ModelConfig.from_load_config(sa.load_config())
    rows, header = _measure_ours(sa, mc, args, ceilings, lead)
    if not lead:
        return
    if args.compare_hf:
        free_device_memory(sa.device)  # the runner went out of scope with _measure_ours
        _measure_hf(rows, sa, mc, args)
    _print_table(rows, ceilings, header)
    if args.result_file:
        with open(args.result_file, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "model": sa.model_path,
                                    "device": _device_name(torch.device(sa.device))}) + "\n")


def _measure_ours(sa: ServerArgs, mc: ModelConfig, args: argparse.Namespace,
                  ceilings: dict[str, float] | None, lead: bool
                  ) -> tuple[list[dict[str, Any]], str]:
    """Our rows and the table's header line. The runner lives only in here, so that
    when this returns its weights, KV pool and CUDA graphs can be freed."""
    runner = ModelRunner(sa.runner_config(), mc)
    kv_per_token = runner._kv_bytes_per_token()
    hf_len = min(args.hf_output_len or args.output_len, args.output_len)
    rows = []
    for input_len in args.input_len:
        for bs in args.batch_size:
            run_one(runner, bs, input_len, min(args.output_len, 8),  # warm up
                    max_prefill_tokens=sa.max_prefill_tokens)
            r = run_one(runner, bs, input_len, args.output_len,
                        max_prefill_tokens=sa.max_prefill_tokens)
            steps = r["decode_steps_s"]
            med = statistics.median(steps) if steps else float("nan")
            row: dict[str, Any] = dict(
                batch_size=bs, input_len=input_len, output_len=args.output_len,
                prefill_latency_s=r["prefill_s"], prefill_tok_s=bs * input_len / r["prefill_s"],
                decode_median_ms=med * 1e3, decode_tok_s=bs / med,
                p99_decode_ms=sorted(steps)[int(0.99 * (len(steps) - 1))] * 1e3 if steps
                else float("nan"))
            if ceilings:
                avg_ctx = input_len + args.output_len / 2
                weight_bytes = decode_weight_bytes(runner.model, mc, bs)
                floor_s = (weight_bytes + bs * avg_ctx * kv_per_token) / ceilings["copy_Bps"]
                row["decode_weight_gb"] = weight_bytes / 1e9
                row["decode_floor_ms"] = floor_s * 1e3
                row["decode_frac_of_floor"] = floor_s / med
                flops = model_flops_per_token(mc) * bs * input_len
                row["prefill_tflops"] = flops / r["prefill_s"] / 1e12
                row["prefill_frac_of_ceiling"] = row["prefill_tflops"] * 1e12 / ceilings["matmul_flops"]
            if sa.tp_size > 1:
                ar = allreduce_step_s(runner, bs)
                row["allreduce_ms_per_step"] = ar * 1e3
                row["allreduce_share"] = ar / med
            if args.compare_hf:
                # Ours over the tokens HF makes: the prefill and hf_len - 1 decode steps.
                row["ours_e2e_tok_s"] = bs * hf_len / (r["prefill_s"] + sum(steps[:hf_len - 1]))
            rows.append(row)
            if lead:
                print(json.dumps(row), flush=True)
    header = (f"model={sa.model_path} device={_device_name(runner.device)} dtype={runner.dtype} "
              f"attention={sa.attention_backend} cuda_graph={runner.cuda_graph_runner is not None}")
    return rows, header


def _measure_hf(rows: list[dict[str, Any]], sa: ServerArgs, mc: ModelConfig,
                args: argparse.Namespace) -> None:
    """Adds HF's figures to the rows of the batch sizes it runs at."""
    wanted = set(args.hf_batch_size or args.batch_size)
    hf_len = min(args.hf_output_len or args.output_len, args.output_len)
    model = build_hf_model(sa.model_path, mc.dtype, sa.device)
    for row in rows:
        if row["batch_size"] not in wanted:
            continue
        hf = hf_generate_tok_s(model, sa.device, row["batch_size"], row["input_len"], hf_len)
        row["hf_tok_s"] = hf
        row["hf_output_len"] = hf_len
        row["speedup_vs_hf"] = row["ours_e2e_tok_s"] / hf
        print(json.dumps({k: row[k] for k in ("batch_size", "input_len", "hf_output_len",
                                              "hf_tok_s", "speedup_vs_hf")}), flush=True)


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _print_table(rows: list[dict[str, Any]], ceilings: dict[str, float] | None,
                 header: str) -> None:
    print(f"\n{header}")
    if ceilings:
        print(f"copy bandwidth {ceilings['copy_Bps'] / 1e12:.2f} TB/s, "
              f"bf16 matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s")
    cols = ["batch_size", "input_len", "prefill_tok_s", "decode_median_ms", "decode_tok_s",
            "decode_floor_ms", "decode_frac_of_floor", "prefill_frac_of_ceiling", "hf_tok_s",
            "speedup_vs_hf"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)) for c in cols))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


if __name__ == "__main__":
    main()
