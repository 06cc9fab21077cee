"""Image-request throughput of a vision-language model (the `vlm-64` workload): N
requests with one square image each (distinct images, so no cache hits), 128 output
tokens, against HF transformers on the same images in the same run.

    python tests/gpu/bench_vl.py --config ../shared/model_configs/qwen2.5-vl-7b
    python tests/gpu/bench_vl.py --config ../shared/model_configs/qwen3-vl-30b-a3b

Weights are random (--load-format dummy; the folder needs only config.json). Reports
requests/s, output tok/s, TTFT p50 (each request's first token, all N submitted at
once), and the vision encoder's share of TTFT (one request alone, encoder timed with
synchronisation); HF runs `generate` on a batch of --hf-requests of the same images.
Prints a short table. The CPU check of this script: tests/test_multimodal_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image


def make_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(n)]


def model_folder(config_dir: str) -> str:
    """A folder with the config (and the image processor's config, when there is one)."""
    out = tempfile.mkdtemp(prefix="bench-vl-")
    for name in ("config.json", "preprocessor_config.json"):
        if os.path.isfile(os.path.join(config_dir, name)):
            shutil.copy(os.path.join(config_dir, name), out)
    return out


def prompt_ids(hf_config: Any, n_text: int, seed: int) -> list[int]:
    """A user turn: the image placeholder, then random text tokens."""
    rng = np.random.default_rng(seed)
    text = hf_config.get_text_config()
    vocab = text.vocab_size
    special = {hf_config.image_token_id, hf_config.video_token_id,
               hf_config.vision_start_token_id, hf_config.vision_end_token_id}
    words = [int(t) for t in rng.integers(1000, min(vocab, 100000), n_text * 2)
             if int(t) not in special][:n_text]
    return [hf_config.vision_start_token_id, hf_config.image_token_id,
            hf_config.vision_end_token_id] + words


class EncoderTimer:
    """Wraps the model's encode_multimodal; `sync`: time it exactly (for one request)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.encode_multimodal
        self.seconds = 0.0
        self.calls = 0
        self.sync = False
        model.encode_multimodal = self

    def __call__(self, items: list[Any]) -> list[torch.Tensor]:
        cuda = torch.cuda.is_available()
        if self.sync and cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.inner(items)
        if self.sync and cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


async def _timed_requests(engine: Any, ids: list[list[int]], images: list[Image.Image],
                          params: dict[str, Any]) -> tuple[float, list[float], int]:
    """(wall seconds, TTFT per request, output tokens), all submitted at once."""
    start = time.perf_counter()

    async def one(i: int) -> tuple[float, int]:
        first, n = None, 0
        stream = await engine.async_generate(input_ids=ids[i], sampling_params=params,
                                             image_data=images[i], stream=True)
        async for chunk in stream:
            if first is None:
                first = time.perf_counter() - start
            n += len(chunk.get("output_ids") or [])
        return first or 0.0, n

    results = await asyncio.gather(*(one(i) for i in range(len(ids))))
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def run_radixserve(args: argparse.Namespace, folder: str, images: list[Image.Image],
                   ids: list[list[int]]) -> dict[str, Any]:
    from radixserve.engine import Engine

    engine = Engine(model_path=folder, load_format="dummy", skip_tokenizer_init=True,
                    device=args.device, dtype=args.dtype,
                    mem_fraction_static=args.mem_fraction_static,
                    max_total_tokens=args.max_total_tokens)
    try:
        timer = EncoderTimer(engine.scheduler.model_runner.model)
        params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
        warm = make_images(2, args.image_size, seed=999)
        engine.generate(input_ids=[ids[0], ids[1]], sampling_params=params, image_data=warm)
        # One request alone: its TTFT, and how much of it the encoder takes.
        timer.sync, timer.seconds = True, 0.0
        alone = make_images(1, args.image_size, seed=998)[0]
        t0 = time.perf_counter()
        engine.generate(input_ids=ids[0], sampling_params={**params, "max_new_tokens": 1},
                        image_data=alone)
        ttft_alone = time.perf_counter() - t0
        share = timer.seconds / ttft_alone
        timer.sync, timer.seconds, timer.calls = False, 0.0, 0
        wall, ttfts, out_tokens = asyncio.run(_timed_requests(engine, ids, images, params))
        return {"engine": "radixserve", "requests": len(ids), "wall_s": wall,
                "req_per_s": len(ids) / wall, "out_tok_per_s": out_tokens / wall,
                "ttft_p50_s": statistics.median(ttfts), "ttft_alone_s": ttft_alone,
                "encoder_share_of_ttft": share, "encoder_calls": timer.calls,
                "output_tokens": out_tokens}
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_hf(args: argparse.Namespace, folder: str, images: list[Image.Image],
           ids: list[list[int]]) -> dict[str, Any]:
    import transformers

    from radixserve.multimodal.families import family_for

    config = transformers.AutoConfig.from_pretrained(folder)
    spec = family_for(config, folder, {})
    n = min(args.hf_requests, len(ids))
    done = [spec.process_image(img) for img in images[:n]]
    pad = config.image_token_id
    rows = []
    for prompt, item in zip(ids[:n], done):
        i = prompt.index(pad)
        rows.append(prompt[:i] + [pad] * item.num_tokens + prompt[i + 1:])
    assert len({len(r) for r in rows}) == 1, "same-size images give same-length prompts"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if args.device == "cuda" else torch.float32)
    cls = getattr(transformers, config.architectures[0])
    with torch.device(args.device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    dev = torch.device(args.device)
    x = torch.tensor(rows, device=dev)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x),
              mm_token_type_ids=(x == pad).int(),
              pixel_values=torch.cat([d.pixel_values for d in done]).to(dev, dtype),
              image_grid_thw=torch.tensor([d.grid_thw for d in done], device=dev))
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(new_tokens: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 **gen)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == x.shape[1] + new_tokens
        return time.perf_counter() - t0

    try:
        timed(2)  # warm-up
        ttft = timed(1)
        wall = timed(args.output_len)
        return {"engine": "hf-transformers", "requests": n, "wall_s": wall,
                "req_per_s": n / wall, "out_tok_per_s": n * args.output_len / wall,
                "ttft_p50_s": ttft, "ttft_alone_s": None, "encoder_share_of_ttft": None}
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'engine':<16} {'reqs':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} "
             f"{'encoder/TTFT':>12}"]
    for r in rows:
        lines.append(f"{r['engine']:<16} {r['requests']:>5} {f(r['req_per_s'], '.2f'):>8} "
                     f"{f(r['out_tok_per_s'], '.1f'):>10} {f(r['ttft_p50_s'], '.3f'):>8}s "
                     f"{f(r['encoder_share_of_ttft'], '.1%'):>12}")
    if len(rows) == 2 and rows[1]["out_tok_per_s"]:
        lines.append(f"throughput vs HF transformers: "
                     f"{rows[0]['out_tok_per_s'] / rows[1]['out_tok_per_s']:.1f}x (target >= 10x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="folder with the model's config.json")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--hf-requests", type=int, default=8)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mem-fraction-static", type=float, default=0.7)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)
    from transformers import AutoConfig

    folder = model_folder(args.config)
    hf_config = AutoConfig.from_pretrained(folder)
    images = make_images(args.requests, args.image_size, seed=0)
    ids = [prompt_ids(hf_config, args.text_len, seed=i) for i in range(args.requests)]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = [run_radixserve(args, folder, images, ids)]
    if not args.skip_hf:
        try:
            rows.append(run_hf(args, folder, images, ids))
        except Exception as exc:  # report ours even if the reference fails
            print(f"HF transformers run failed: {type(exc).__name__}: {exc}")
    for r in rows:
        print(json.dumps({**r, "device": device_name, "config": args.config}))
    print(f"\n{os.path.basename(args.config.rstrip('/'))} on {device_name}: {args.requests} "
          f"requests, one {args.image_size}x{args.image_size} image each, "
          f"{args.output_len} output tokens")
    print(table(rows))
    shutil.rmtree(folder, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
