"""SGLang frontend programs, run as a script against a server; prints their results as JSON.

`python tests/sglang_frontend_programs.py URL API_KEY`. tests/test_sglang_frontend.py
runs it in a child process: importing `sglang` patches transformers in place, which
must not leak into the test process (the HF parity tests share it).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sglang as sgl

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
SELECT_CASES = [("The capital of France is", [" a banana split", " Paris"]),
                ("1, 2, 3, 4,", [" purple", " 5"])]
TIPS_BASE = "Here are two tips for staying healthy."
QUESTIONS = ["Name a color.", "Name an animal.", "Name a fruit."]


@sgl.function
def chat_qa(s: Any, question: str) -> None:
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24, temperature=0, stop=["\n"]))


@sgl.function
def constrained(s: Any) -> None:
    s += "Pick a number: " + sgl.gen("num", max_tokens=8, regex=r"[0-9]{2,3}", temperature=0)
    s += "\nAn integer: " + sgl.gen("int", dtype=int, max_tokens=8)
    s += "\nThree facts about the Sun. First," + sgl.gen(
        "fact", max_tokens=40, temperature=0, stop_regex=r"[.!?]")


@sgl.function
def person(s: Any) -> None:
    s += sgl.user("Describe a person as JSON with a name and an age.")
    s += sgl.assistant(sgl.gen("json", max_tokens=48, temperature=0,
                               json_schema=json.dumps(SCHEMA)))


@sgl.function
def pick(s: Any, prefix: str, choices: list[str]) -> None:
    s += prefix + sgl.select("answer", choices=choices)


@sgl.function
def tips(s: Any) -> None:
    s += TIPS_BASE
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"\nTip {i + 1}: Always" + sgl.gen("tip", max_tokens=12, temperature=0, stop=".")
    forks.join()
    s += "\nSummary:" + sgl.gen("summary", max_tokens=8, temperature=0)


def run_all(url: str, api_key: str) -> dict[str, Any]:
    # SmolLM2 is a ChatML model; the frontend would guess its template from the path.
    backend = sgl.RuntimeEndpoint(url, api_key=api_key, chat_template_name="chatml")
    sgl.set_default_backend(backend)
    out: dict[str, Any] = {}
    qa = chat_qa.run(question="What is the capital of France?")
    out["qa"] = {"answer": qa["answer"], "text": qa.text()}
    c = constrained.run()
    out["constrained"] = {"num": c["num"], "int": c["int"], "fact": c["fact"], "text": c.text()}
    out["json"] = {"text": person.run()["json"], "schema": SCHEMA}
    out["select"] = []
    for prefix, choices in SELECT_CASES:
        state = pick.run(prefix=prefix, choices=choices)
        meta = state.get_meta_info("answer")
        out["select"].append({"answer": state["answer"], "choices": choices,
                              "scores": meta["normalized_prompt_logprobs"],
                              "token_texts": [e[2] for e in meta["input_token_logprobs"][0]]})
    t = tips.run()
    out["fork"] = {"tips": t["tip"], "text": t.text(), "summary": t["summary"]}
    batch = chat_qa.run_batch([{"question": q} for q in QUESTIONS], num_threads=3,
                              progress_bar=False)
    out["batch"] = {"batch": [s["answer"] for s in batch],
                    "single": [chat_qa.run(question=q)["answer"] for q in QUESTIONS]}
    streamed = chat_qa.run(question="Say hello.", stream=True)
    out["stream"] = {"streamed": "".join(streamed.text_iter("answer")),
                     "whole": chat_qa.run(question="Say hello.")["answer"]}
    backend.flush_cache()
    out["control"] = {"max_total_num_tokens": backend.get_server_info()["max_total_num_tokens"],
                      "model_name": backend.get_model_name(),
                      "model_path": backend.model_info["model_path"]}
    return out


if __name__ == "__main__":
    print(json.dumps(run_all(sys.argv[1], sys.argv[2])))
