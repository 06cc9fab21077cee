"""The server with DP-attention and the expert-load recorder: two DP-attention ranks
behind the API server give one rank's greedy tokens, and SGLang's recorder routes
start, dump (the record summed over the ranks, also written to a file) and stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx2
import pytest

from radixserve.engine import Engine
from tests.conftest import start_server
from tests.moe_factory import make_tiny_moe_checkpoint

PROMPTS = [[1, 5, 9, 200, 3000], [1, 7, 7, 7], [1, 42] * 20, [3, 1, 4, 1, 5]]
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_moe_checkpoint("qwen3-moe", tmp_path_factory.mktemp("eps") / "m",
                                    with_tokenizer=False)


def test_server_dp_attention_and_recorder_routes(moe_path: Path) -> None:
    with Engine(str(moe_path), skip_tokenizer_init=True, log_level="warning",
                disable_radix_cache=True, expert_distribution_recorder_mode="stat") as engine:
        engine.start_expert_distribution_record()
        ref = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        ref_record = engine.dump_expert_distribution_record()
    live = start_server("--model-path", str(moe_path), "--skip-tokenizer-init",
                        "--tp-size", "2", "--dp-size", "2", "--ep-size", "2",
                        "--enable-dp-attention", "--disable-radix-cache",
                        "--expert-distribution-recorder-mode", "stat", log_name="ep-server")
    try:
        url = live.url
        assert httpx2.post(f"{url}/start_expert_distribution_record",
                           timeout=60).json() == {"success": True}
        outs = httpx2.post(f"{url}/generate", json={"input_ids": PROMPTS,
                                                    "sampling_params": GREEDY},
                           timeout=300).raise_for_status().json()
        assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in ref]
        dump = httpx2.post(f"{url}/dump_expert_distribution_record", timeout=60)
        assert dump.status_code == 200
        body = dump.json()
        assert body["mode"] == "stat" and body["moe_layers"] == ref_record["moe_layers"]
        assert body["logical_count"] == ref_record["logical_count"]
        assert json.loads(Path(body["path"]).read_text())["logical_count"] == \
            ref_record["logical_count"]
        Path(body["path"]).unlink()
        assert httpx2.post(f"{url}/stop_expert_distribution_record",
                           timeout=60).status_code == 200
    finally:
        live.proc.send_signal(signal.SIGTERM)
        assert live.proc.wait(timeout=60) == 0


def test_recorder_off_answers_with_the_flag(moe_path: Path) -> None:
    with Engine(str(moe_path), skip_tokenizer_init=True, log_level="warning") as engine:
        with pytest.raises(ValueError, match="--expert-distribution-recorder-mode"):
            engine.dump_expert_distribution_record()
