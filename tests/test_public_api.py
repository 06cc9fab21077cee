"""The package's public API, shaped like SGLang's: `import radixserve as rs`,
`rs.Engine`, `rs.__version__`, and `Engine.async_generate` (single, batch, stream,
concurrent calls from one event loop)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest

import radixserve as rs
from tests.model_factory import make_tiny_checkpoint

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog because"]


def test_import_is_light_and_versioned() -> None:
    code = ("import sys, radixserve as rs; "
            "assert 'torch' not in sys.modules, 'import radixserve pulled in torch'; "
            "assert 'radixserve.engine' not in sys.modules; print(rs.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == rs.__version__
    from importlib.metadata import version

    assert rs.__version__ == version("radixserve")
    from radixserve.engine import Engine

    assert rs.Engine is Engine and "Engine" in dir(rs)
    with pytest.raises(AttributeError):
        rs.NoSuchThing  # noqa: B018


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("public-api"))
    engine = rs.Engine(model_path=str(path), max_total_tokens=4096)
    yield engine
    engine.shutdown()


def test_async_generate_single_and_batch(eng: Any) -> None:
    want_one = eng.generate(PROMPTS[0], GREEDY)
    want_batch = eng.generate(PROMPTS, GREEDY)

    async def run() -> tuple[Any, Any]:
        return (await eng.async_generate(PROMPTS[0], GREEDY),
                await eng.async_generate(PROMPTS, GREEDY))

    one, batch = asyncio.run(run())
    assert isinstance(one, dict) and one["output_ids"] == want_one["output_ids"]
    assert one["text"] == want_one["text"]
    assert one["meta_info"]["completion_tokens"] == 12
    assert [b["output_ids"] for b in batch] == [w["output_ids"] for w in want_batch]


def test_async_stream_matches_sync_stream(eng: Any) -> None:
    sync_pieces = list(eng.generate(PROMPTS[1], GREEDY, stream=True))

    async def run() -> list[dict[str, Any]]:
        stream = await eng.async_generate(PROMPTS[1], GREEDY, stream=True)
        return [piece async for piece in stream]

    pieces = asyncio.run(run())
    assert [p["output_ids"] for p in pieces] == [p["output_ids"] for p in sync_pieces]
    assert [p["text"] for p in pieces] == [p["text"] for p in sync_pieces]
    assert pieces[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(p["index"] == 0 for p in pieces)


def test_concurrent_async_calls_share_the_scheduler(eng: Any) -> None:
    want = [eng.generate(p, GREEDY)["output_ids"] for p in PROMPTS]

    async def run() -> tuple[list[Any], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:  # runs only if the loop is not blocked
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(eng.async_generate(p, GREEDY) for p in PROMPTS),
                                    _collect(eng, PROMPTS[0]))
        done.set()
        await task
        return outs, ticks

    (a, b, streamed), ticks = asyncio.run(run())
    assert [a["output_ids"], b["output_ids"]] == want
    assert streamed == want[0]
    assert ticks > 3
    info = eng.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


async def _collect(eng: Any, prompt: str) -> list[int]:
    stream = await eng.async_generate(prompt, GREEDY, stream=True)
    ids: list[int] = []
    async for piece in stream:
        ids += piece["output_ids"]
    return ids


def test_abandoned_stream_is_aborted(eng: Any) -> None:
    async def run() -> None:
        stream = await eng.async_generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 500},
                                          stream=True)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(run())
    gen = eng.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 500}, stream=True)
    next(gen)
    gen.close()
    # The aborts are applied at the next step: a new request runs and nothing leaks.
    assert eng.generate(PROMPTS[0], GREEDY)["meta_info"]["completion_tokens"] == 12
    deadline = time.monotonic() + 10
    while True:
        info = eng.get_server_info()
        if info.available_tokens + info.evictable_tokens == info.max_total_num_tokens:
            break
        assert time.monotonic() < deadline, info
        eng.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 1})


def test_async_errors_and_unsupported_parameters(eng: Any) -> None:
    async def run(**kwargs: Any) -> Any:
        return await eng.async_generate(**kwargs)

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(run(prompt=""))
    with pytest.raises(ValueError, match="top_logprobs_num"):
        asyncio.run(run(prompt="hi", top_logprobs_num=21))
    with pytest.raises(ValueError, match="lora_path"):
        asyncio.run(run(prompt="hi", lora_path="a"))
    # Images are SGLang's image_data; this (text-only) model refuses them.
    with pytest.raises(ValueError, match="takes text only"):
        asyncio.run(run(prompt="hi", image_data="cat.png"))
    with pytest.raises(ValueError, match="return_hidden_states"):
        eng.generate("hi", return_hidden_states=True)
    with pytest.raises(TypeError, match="no_such_parameter"):
        eng.generate("hi", no_such_parameter=1)
    # At their defaults the SGLang-only parameters are accepted.
    out = asyncio.run(run(prompt="hi", sampling_params=GREEDY, image_data=None,
                          lora_path=None, return_hidden_states=False, rid="my-rid"))
    assert out["meta_info"]["id"] == "my-rid"


def test_async_logprobs(eng: Any) -> None:
    want = eng.generate(PROMPTS[1], GREEDY, return_logprob=True, top_logprobs_num=3,
                        logprob_start_len=0)

    async def run() -> Any:
        return await eng.async_generate(PROMPTS[1], GREEDY, return_logprob=True,
                                        top_logprobs_num=3, logprob_start_len=0)

    got = asyncio.run(run())
    for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs"):
        assert len(got["meta_info"][key]) == len(want["meta_info"][key])
    assert [t for _, t in got["meta_info"]["output_token_logprobs"]] == got["output_ids"]
