"""SGLang's own frontend language (the `sglang` package's `sglang.lang`, a client only)
runs its programs against radixserve's server with the real SmolLM2: gen with stop,
stop_regex, regex, dtype and json_schema constraints, select, fork/join, run_batch,
streaming and chat roles. Each result is checked against a property the constraint
promises, or against the same greedy request sent to /generate directly.

The programs (tests/sglang_frontend_programs.py) run in a child process, as importing
`sglang` patches transformers in place. Optional dependency:
`pip install --no-deps sglang` and `pip install -e .[sglang-frontend]`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.model_factory import smollm2_tokenizer

if importlib.util.find_spec("sglang") is None:
    pytest.skip("the sglang frontend is not installed", allow_module_level=True)

PROGRAMS = os.path.join(os.path.dirname(__file__), "sglang_frontend_programs.py")


@pytest.fixture(scope="module")
def results(server: LiveServer) -> dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, PROGRAMS, server.url, server.api_key],
                         capture_output=True, text=True, timeout=900, cwd=repo)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _greedy(server: LiveServer, text: str, **params: Any) -> dict[str, Any]:
    with server.client() as c:
        return c.post("/generate", json={"text": text, "sampling_params": {
            "temperature": 0, **params}}).raise_for_status().json()


def test_gen_with_roles_matches_generate(server: LiveServer, results: dict) -> None:
    answer, text = results["qa"]["answer"], results["qa"]["text"]
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    prefix = text[:len(text) - len(answer) - len("<|im_end|>\n")]
    assert prefix.endswith("<|im_start|>assistant\n")
    want = _greedy(server, prefix, max_new_tokens=24, stop=["\n"])
    assert answer == want["text"] and answer and "\n" not in answer
    assert "Paris" in answer


def test_regex_dtype_and_stop_regex(server: LiveServer, results: dict) -> None:
    got = results["constrained"]
    assert re.fullmatch(r"[0-9]{2,3}", got["num"])
    int(got["int"])
    fact = got["fact"]
    prefix = got["text"][:-len(fact)]
    # The reference: the same greedy run without the stop, cut after the first token
    # whose text completes a match (kept, as SGLang keeps it).
    ids = _greedy(server, prefix, max_new_tokens=40)["output_ids"]
    tok = smollm2_tokenizer()
    cut = next(k for k in range(1, len(ids) + 1)
               if re.search(r"[.!?]", tok.decode(ids[:k], skip_special_tokens=True)))
    assert cut < len(ids) and fact == tok.decode(ids[:cut], skip_special_tokens=True)


def test_json_schema(results: dict) -> None:
    import jsonschema

    jsonschema.validate(json.loads(results["json"]["text"]), results["json"]["schema"])


def test_select_picks_the_likelier_choice(results: dict) -> None:
    for case, want in zip(results["select"], [" Paris", " 5"]):
        assert case["answer"] == want
        assert case["scores"][case["choices"].index(want)] == max(case["scores"])
        # Token text came back with the logprobs (return_text_in_logprobs).
        assert all(isinstance(t, str) for t in case["token_texts"])


def test_fork_join(server: LiveServer, results: dict) -> None:
    got = results["fork"]
    base = "Here are two tips for staying healthy."
    want = [_greedy(server, f"{base}\nTip {i + 1}: Always", max_new_tokens=12,
                    stop=".")["text"] for i in range(2)]
    assert got["tips"] == want and all(want)  # join gathers each fork's variable
    assert got["text"].startswith(base + "\nSummary:") and got["summary"]


def test_run_batch_equals_one_by_one(results: dict) -> None:
    assert results["batch"]["batch"] == results["batch"]["single"]
    assert all(results["batch"]["single"])


def test_streaming_equals_whole(results: dict) -> None:
    assert results["stream"]["streamed"] == results["stream"]["whole"]
    assert results["stream"]["whole"]


def test_frontend_control_calls(server: LiveServer, results: dict) -> None:
    control = results["control"]
    assert control["max_total_num_tokens"] > 0
    assert control["model_name"] == control["model_path"]
    server.wait_idle()
