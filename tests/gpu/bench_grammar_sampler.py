"""Device time a grammar mask adds to a greedy decode step, at Qwen3's vocabulary.

    python tests/gpu/bench_grammar_sampler.py

Two parts. The sampler: the logits-processor path (float32 copy, xgrammar's mask,
argmax) against the masked-argmax kernel, each a median of triton.testing.do_bench,
next to the plain argmax a batch without grammar pays. The upload: a stand-in forward
(bf16 matmuls, ~3 ms) then the [B, V/32] bitmask's copy and the sampling, timed end to
end with the copy queued behind the forward (before) and on a side stream (now).
"""

from __future__ import annotations

import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from radixserve.constrained.xgrammar_backend import VocabMask  # noqa: E402
from radixserve.core.req import Req  # noqa: E402
from radixserve.core.sampling_params import SamplingParams  # noqa: E402
from radixserve.device_utils import to_device_beside  # noqa: E402
from radixserve.layers.sampler import Sampler  # noqa: E402
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo  # noqa: E402

DEV = torch.device("cuda")
VOCAB = 151936


def greedy_info(batch: int) -> SamplingBatchInfo:
    params = SamplingParams(temperature=0.0)
    params.normalize()
    reqs = [Req(f"r{i}", [1], params) for i in range(batch)]
    return SamplingBatchInfo.from_reqs(reqs, VOCAB, DEV)


def host_bitmask(batch: int) -> torch.Tensor:
    words = torch.randint(-2**31, 2**31, (batch, (VOCAB + 31) // 32), dtype=torch.int64)
    words[:, 49152 // 32:] = 0  # a 49,152-token tokenizer's grammar, as bench_grammar.py
    return words.to(torch.int32).pin_memory()


def median_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_sampler(batch: int) -> tuple[float, float, float]:
    logits = torch.randn(batch, VOCAB, device=DEV)
    info = greedy_info(batch)
    plain = median_us(lambda: Sampler()(logits, info))
    info.vocab_mask = VocabMask(host_bitmask(batch).to(DEV), None)
    old = Sampler(fused_grammar_argmax=False)
    new = Sampler(fused_grammar_argmax=True)
    assert torch.equal(old(logits, info), new(logits, info))
    return plain, median_us(lambda: old(logits, info)), median_us(lambda: new(logits, info))


def bench_upload(batch: int, side: bool, reps: int = 20) -> float:
    """Milliseconds from the forward's launch to the sampled ids, per step."""
    x = torch.randn(2048, 4096, dtype=torch.bfloat16, device=DEV)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=DEV)
    logits = torch.randn(batch, VOCAB, device=DEV)
    info, mask = greedy_info(batch), host_bitmask(batch)
    sampler = Sampler(fused_grammar_argmax=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(12):
            x = torch.tanh(x @ w)
        bitmask = to_device_beside([mask], DEV)[0] if side else mask.to(DEV, non_blocking=True)
        info.vocab_mask = VocabMask(bitmask, None)
        sampler(logits, info)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, V={VOCAB}, float32 logits")
    print("batch  argmax_us  processor_path_us  masked_argmax_us")
    for batch in (1, 16, 64, 256):
        plain, old, new = bench_sampler(batch)
        print(f"{batch:5d}  {plain:9.1f}  {old:17.1f}  {new:16.1f}")
    print("batch  forward+copy+sample_ms (copy behind)  (copy beside)")
    for batch in (64, 256):
        behind, beside = bench_upload(batch, side=False), bench_upload(batch, side=True)
        print(f"{batch:5d}  {behind:36.3f}  {beside:13.3f}")


if __name__ == "__main__":
    main()
