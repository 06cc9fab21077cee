"""SGLang's native API surface on the live server: every SGLang sampling parameter on
/generate, stop_regex against a reference cut of the unconstrained output, grammar
extras on the OpenAI endpoints, /tokenize and /detokenize against the tokenizer, the
info/control aliases SGLang's clients call, and 400s naming the field."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.model_factory import smollm2_tokenizer

PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 24, "temperature": 0}


def _generate(c: Any, text: str, **params: Any) -> dict[str, Any]:
    r = c.post("/generate", json={"text": text, "sampling_params": {**GREEDY, **params}})
    assert r.status_code == 200, r.text
    return r.json()


def _bad(c: Any, path: str, body: Any, param: str | None) -> str:
    r = c.post(path, json=body)
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert err["param"] == param, (body, err)
    return err["message"]


def test_every_sglang_sampling_parameter_is_accepted(server: LiveServer) -> None:
    neutral = {"min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [],
               "stop_regex": [], "top_p": 1.0, "top_k": -1, "min_p": 0.0,
               "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
               "ignore_eos": False, "skip_special_tokens": True,
               "spaces_between_special_tokens": True, "no_stop_trim": False,
               "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
               "custom_params": {"anything": 1}, "stream_interval": 2, "logit_bias": None,
               "sampling_seed": 7}
    with server.client() as c:
        plain = _generate(c, PROMPT)
        full = c.post("/generate", json={
            "text": PROMPT, "sampling_params": {**GREEDY, **neutral}, "rid": "compat-1",
            "return_text_in_logprobs": True, "log_metrics": False, "image_data": None,
            "lora_path": None, "return_hidden_states": False}).json()
    assert full["text"] == plain["text"] and full["output_ids"] == plain["output_ids"]
    assert full["meta_info"]["id"] == "compat-1"


def test_stop_regex_cuts_where_the_reference_matches(server: LiveServer) -> None:
    tok = smollm2_tokenizer()
    pattern = r"\b[Ff]rance\b|[.,;]"
    with server.client() as c:
        ref = _generate(c, "Paris is the capital and largest city of", max_new_tokens=32)
        got = _generate(c, "Paris is the capital and largest city of", max_new_tokens=32,
                        stop_regex=pattern)
    ids = ref["output_ids"]
    cut = next(k for k in range(1, len(ids) + 1) if re.search(pattern, tok.decode(ids[:k])))
    assert cut < len(ids)
    assert got["output_ids"] == ids[:cut]
    assert got["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert got["text"] == tok.decode(ids[:cut])  # the matched text is kept


def test_structural_tag_and_bad_grammars(server: LiveServer) -> None:
    tag = {"type": "structural_tag", "triggers": ["<f>"], "structures": [{
        "begin": "<f>", "end": "</f>",
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                   "required": ["a"]}}]}
    with server.client() as c:
        out = _generate(c, "Call the function like <f>{\"a\": 1}</f>. Now call it: <f>",
                        max_new_tokens=24, structural_tag=json.dumps(tag))
        # Whatever follows a trigger the model writes is the schema's JSON, then </f>.
        for body in re.findall(r"<f>(.*?)</f>", out["text"], re.S):
            assert isinstance(json.loads(body)["a"], int)
        _bad(c, "/generate", {"text": "x", "sampling_params": {"structural_tag": "{"}},
             "structural_tag")
        _bad(c, "/generate", {"text": "x", "sampling_params": {"stop_regex": "(unclosed"}},
             "stop_regex")
        _bad(c, "/generate", {"text": "x", "sampling_params": {"stop_regex": 5}}, "stop_regex")
        _bad(c, "/generate", {"text": "x", "sampling_params": {"stream_interval": 0}},
             "stream_interval")
        _bad(c, "/generate", {"text": "x", "sampling_params": {"regex": "a", "ebnf": "b"}},
             "sampling_params")
    server.wait_idle()


def test_unsupported_request_fields_are_refused(server: LiveServer) -> None:
    with server.client() as c:
        for name, value in (("image_data", "data:image/png;base64,AA=="),
                            ("lora_path", "adapter"), ("input_embeds", [[0.0]]),
                            ("return_hidden_states", True)):
            msg = _bad(c, "/generate", {"text": "x", name: value}, name)
            assert name in msg
        assert c.get("/health").status_code == 200


def test_openai_grammar_extras_are_honoured(server: LiveServer) -> None:
    with server.client() as c:
        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "In which year did WW2 end?"}],
            "regex": r"[0-9]{4}", "max_tokens": 8, "temperature": 0}).json()
        assert re.fullmatch(r"[0-9]{4}", chat["choices"][0]["message"]["content"])
        comp = c.post("/v1/completions", json={
            "prompt": "Answer yes or no: is the sky blue?", "ebnf": 'root ::= "yes" | "no"',
            "max_tokens": 4, "temperature": 0}).json()
        assert comp["choices"][0]["text"] in ("yes", "no")
        stop = c.post("/v1/completions", json={
            "prompt": "Paris is the capital and largest city of", "stop_regex": r"[.,;]",
            "max_tokens": 32, "temperature": 0}).json()
        assert re.search(r"[.,;]", stop["choices"][0]["text"])
        _bad(c, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "regex": "a",
            "response_format": {"type": "json_object"}}, "sampling_params")


def test_tokenize_and_detokenize_match_the_tokenizer(server: LiveServer) -> None:
    tok = smollm2_tokenizer()
    texts = ["Hello world", "Ünïcödé and emoji 🙂", "a"]
    messages = [{"role": "user", "content": "hi"}]
    with server.client() as c:
        one = c.post("/tokenize", json={"prompt": texts[0]}).json()
        assert one["tokens"] == tok.encode(texts[0]) and one["count"] == len(one["tokens"])
        assert one["max_model_len"] == c.get("/model_info").json()["context_length"]
        many = c.post("/v1/tokenize", json={"prompt": texts,
                                            "add_special_tokens": False}).json()
        assert many["tokens"] == [tok.encode(t, add_special_tokens=False) for t in texts]
        assert many["count"] == [len(t) for t in many["tokens"]]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat["tokens"] == tok.encode(want, add_special_tokens=False)
        back = c.post("/detokenize", json={"tokens": many["tokens"]}).json()
        assert back["text"] == texts
        single = c.post("/v1/detokenize", json={"tokens": chat["tokens"],
                                                "skip_special_tokens": False}).json()
        assert single["text"] == tok.decode(chat["tokens"])


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"prompt": []}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, "messages.0.role"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": [[1], [-1]]}, "tokens.1"),
    ("/detokenize", {}, "tokens"),
])
def test_tokenization_bad_input(server: LiveServer, path: str, body: Any, param: str) -> None:
    with server.client() as c:
        _bad(c, path, body, param)
        assert c.post("/tokenize", json={"prompt": "still serving"}).status_code == 200


def test_info_and_control_routes(server: LiveServer) -> None:
    with server.client() as c:
        model_info = c.get("/get_model_info").json()
        assert c.get("/model_info").json() == model_info
        # The default model is a GGUF of SmolLM2: Llama's architecture (the router reads these).
        assert (model_info["model_type"], model_info["architectures"]) == \
            ("llama", ["LlamaForCausalLM"])
        info = c.get("/server_info").json()
        assert info["max_total_num_tokens"] > 0 and "api_key" not in info
        name = c.get("/v1/models").json()["data"][0]["id"]
        card = c.get(f"/v1/models/{name}")
        assert card.status_code == 200 and card.json()["id"] == name
        missing = c.get("/v1/models/no-such-model")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
        from radixserve import __version__

        assert c.get("/version").json() == {"version": __version__}
        server.wait_idle()
        assert c.get("/flush_cache").status_code == 200  # GET too, as SGLang's clients send
        put = c.put("/generate", json={"text": PROMPT, "sampling_params": GREEDY})
        assert put.status_code == 200 and put.json()["text"]
    server.wait_idle()
