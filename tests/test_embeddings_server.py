"""Embedding and classification servers end to end: the real default model (SmolLM2)
served with --is-embedding through the official `openai` client, a tiny classifier
against HF transformers, and bad input on every pooling route (a 400 naming the field,
the server still serving, the KV pool idle afterwards)."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import httpx2
import openai
import pytest
import torch

from tests.conftest import API_KEY, LiveServer, start_server
from tests.model_factory import smollm2_tokenizer, tiny_config

TOL = 1e-5
TEXTS = ["The capital of France is Paris.", "Embeddings map text to vectors", "hi"]


def _stop(server: LiveServer) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def embed_server() -> Iterator[LiveServer]:
    server = start_server("--api-key", API_KEY, "--is-embedding", log_name="embedding")
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def client(embed_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key=API_KEY, timeout=120)


@pytest.fixture(scope="module")
def offline() -> Iterator[Any]:
    from radixserve.engine import Engine

    engine = Engine(is_embedding=True, disable_progress_bar=True)
    yield engine
    engine.shutdown()


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < TOL


def _unit(v: list[float]) -> bool:
    return abs(math.sqrt(math.fsum(x * x for x in v)) - 1.0) < 1e-5


# --- the real model with --is-embedding, through the openai client ------------------

def test_single_and_batch_match_the_offline_engine(client: openai.OpenAI,
                                                   offline: Any) -> None:
    want = [r["embedding"] for r in offline.encode(TEXTS)]
    single = client.embeddings.create(model="default", input=TEXTS[0])
    assert len(single.data) == 1 and single.data[0].index == 0
    assert _close(single.data[0].embedding, want[0]) and _unit(want[0])
    assert len(want[0]) == 576  # SmolLM2's hidden size
    assert single.usage.prompt_tokens == len(smollm2_tokenizer().encode(TEXTS[0]))
    batch = client.embeddings.create(model="default", input=TEXTS)
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert all(_close(d.embedding, w) for d, w in zip(batch.data, want))
    assert batch.usage.prompt_tokens == sum(len(smollm2_tokenizer().encode(t)) for t in TEXTS)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens


def test_token_lists_equal_their_text(client: openai.OpenAI) -> None:
    ids = [smollm2_tokenizer().encode(t) for t in TEXTS]
    from_text = client.embeddings.create(model="default", input=TEXTS)
    one = client.embeddings.create(model="default", input=ids[1])
    many = client.embeddings.create(model="default", input=ids)
    assert _close(one.data[0].embedding, from_text.data[1].embedding)
    assert all(_close(a.embedding, b.embedding) for a, b in zip(many.data, from_text.data))


def test_dimensions_truncate_and_renormalize(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model="default", input=TEXTS).data
    cut = client.embeddings.create(model="default", input=TEXTS, dimensions=64).data
    for f, c in zip(full, cut):
        head = f.embedding[:64]
        norm = math.sqrt(math.fsum(x * x for x in head))
        assert len(c.embedding) == 64 and _unit(c.embedding)
        assert _close(c.embedding, [x / norm for x in head])


def test_base64_is_the_float32_bytes(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="default", input=TEXTS[:2],
                                      encoding_format="float").data
    raw = client.embeddings.create(model="default", input=TEXTS[:2],
                                   encoding_format="base64").data
    for f, r in zip(floats, raw):
        assert isinstance(r.embedding, str)
        data = base64.b64decode(r.embedding)
        decoded = list(struct.unpack(f"<{len(data) // 4}f", data))
        # Little-endian float32, one per value (another layout would decode to noise).
        # Not bit-equal: the second call reuses the first's cached prefix KV, computed
        # in another batch shape.
        assert len(data) == 4 * 576 and _close(decoded, f.embedding)


def test_native_encode_shape(embed_server: LiveServer, offline: Any) -> None:
    with embed_server.client() as c:
        one = c.post("/encode", json={"text": TEXTS[0]}).raise_for_status().json()
        many = c.post("/encode", json={"text": TEXTS[:2], "dimensions": 32}).json()
    assert set(one) == {"embedding", "meta_info"}
    assert _close(one["embedding"], offline.encode(TEXTS[0])["embedding"])
    assert one["meta_info"]["prompt_tokens"] == len(smollm2_tokenizer().encode(TEXTS[0]))
    assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    want = offline.encode(TEXTS[:2], dimensions=32)
    assert isinstance(many, list) and len(many) == 2
    assert all(_close(m["embedding"], w["embedding"]) for m, w in zip(many, want))


def test_generation_routes_are_refused_and_the_rest_serve(embed_server: LiveServer,
                                                          client: openai.OpenAI) -> None:
    with embed_server.client() as c:
        for path, body in [
                ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}}),
                ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
                ("/v1/chat/completions", {"model": "m",
                                          "messages": [{"role": "user", "content": "hi"}]})]:
            r = c.post(path, json=body)
            assert r.status_code == 400, path
            assert r.json()["error"]["param"] == "model"
            assert "/v1/embeddings" in r.json()["error"]["message"]
        assert c.get("/get_model_info").json()["is_generation"] is False
        assert c.get("/health_generate").status_code == 200
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    assert len(client.models.list().data) == 1
    embed_server.wait_idle()


# --- bad input on the pooling routes -----------------------------------------------

_TOO_LONG_IDS = [5] * 8193  # SmolLM2's context is 8192 tokens
_BAD_EMBEDDINGS = [
    ({"input": 5}, "input"), ({"input": [1, "a"]}, "input"), ({"input": None}, "input"),
    ({"input": [True, 2]}, "input"), ({}, "input"),
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
    ({"input": [[1, 2], []]}, "input"), ({"input": [49152]}, "input"),
    ({"input": _TOO_LONG_IDS}, "input"), ({"input": "word " * 9000}, "input"),
    ({"input": "x", "dimensions": 577}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": "8"}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
]
_BAD_ENCODE = [
    ({"text": 5}, "text"), ({"input_ids": "abc"}, "input_ids"), ({}, "text"),
    ({"text": "a", "input_ids": [1]}, "text"), ({"text": ""}, "prompt"),
    ({"text": []}, "text"), ({"input_ids": []}, "prompt"), ({"input_ids": [[1], []]}, "prompt"),
    ({"input_ids": _TOO_LONG_IDS}, "prompt"), ({"input_ids": [-1]}, "input_ids"),
    ({"text": "x", "dimensions": 1000}, "dimensions"),
    ({"text": "x", "image_data": "a.png"}, "image_data"), ([1, 2], None),
]


def _expect_400(server: LiveServer, path: str, body: Any, param: str | None) -> None:
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, (path, body, r.text[:200])
    assert r.json()["error"]["param"] == param, (path, body, r.json())


@pytest.mark.parametrize("body,param", _BAD_EMBEDDINGS,
                         ids=[str(i) for i in range(len(_BAD_EMBEDDINGS))])
def test_bad_embeddings_input_is_a_400(embed_server: LiveServer, body: Any,
                                       param: str) -> None:
    _expect_400(embed_server, "/v1/embeddings", body, param)


@pytest.mark.parametrize("path", ["/encode", "/classify"])
def test_bad_encode_input_is_a_400(embed_server: LiveServer, path: str) -> None:
    for body, param in _BAD_ENCODE:
        _expect_400(embed_server, path, body, param)


def test_server_serves_and_is_idle_after_bad_input(embed_server: LiveServer,
                                                   client: openai.OpenAI) -> None:
    _expect_400(embed_server, "/v1/classify", {"input": "hi"}, "model")  # not a classifier
    with embed_server.client() as c:
        assert c.get("/health").status_code == 200
    assert len(client.embeddings.create(model="default", input="still here").data) == 1
    info = embed_server.wait_idle()
    assert info["num_aborted_requests_total"] == 0


# --- a classifier: /classify and /v1/classify against HF -----------------------------

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    from transformers import AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    config = tiny_config("qwen2")
    config.num_labels, config.id2label = 3, LABELS
    config.label2id = {v: k for k, v in LABELS.items()}
    config.pad_token_id = 0
    AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    server = start_server("--api-key", API_KEY, "--model-path", str(path),
                          log_name="classifier")
    yield server, path
    _stop(server)


def test_classify_scores_match_hf(classifier: tuple[LiveServer, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    server, path = classifier
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids = [smollm2_tokenizer().encode(t) for t in TEXTS]
    with torch.no_grad():
        want = [hf(torch.tensor([i])).logits[0].tolist() for i in ids]
    with server.client() as c:
        native = c.post("/classify", json={"text": TEXTS}).raise_for_status().json()
        openai_shape = c.post("/v1/classify", json={"input": TEXTS}).raise_for_status().json()
        one = c.post("/v1/classify", json={"input": ids[2]}).raise_for_status().json()
    assert all(_close(n["embedding"], w) for n, w in zip(native, want))
    assert openai_shape["object"] == "list" and len(openai_shape["data"]) == 3
    for item, w in zip(openai_shape["data"], want):
        probs = torch.softmax(torch.tensor(w), 0)
        assert _close(item["probs"], probs.tolist()) and item["num_classes"] == 3
        assert item["label"] == LABELS[int(probs.argmax())]
    assert openai_shape["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    assert _close(one["data"][0]["probs"], openai_shape["data"][2]["probs"])


def test_classifier_bad_input_is_a_400(classifier: tuple[LiveServer, Path]) -> None:
    server, _path = classifier
    for body, param in [({"input": 3}, "input"), ({"input": ""}, "input"),
                        ({"input": []}, "input"), ({"input": [5] * 1025}, "input"),
                        ({}, "input")]:
        _expect_400(server, "/v1/classify", body, param)
    for body, param in _BAD_ENCODE[:-3]:
        if param == "prompt" and body.get("input_ids") == _TOO_LONG_IDS:
            continue  # the tiny model's context is shorter; covered below
        _expect_400(server, "/classify", body, param)
    _expect_400(server, "/classify", {"input_ids": [5] * 1025}, "prompt")
    _expect_400(server, "/classify", {"text": "x", "dimensions": 2}, "dimensions")
    _expect_400(server, "/v1/embeddings", {"input": "hi"}, "model")
    _expect_400(server, "/generate", {"text": "hi"}, "model")
    with server.client() as c:
        assert c.post("/v1/classify", json={"input": "ok"}).status_code == 200
    server.wait_idle()


# --- fuzz: whatever the body, a 200 or a 400, and the server keeps serving ----------

def test_fuzzed_pooling_bodies_are_answered(embed_server: LiveServer) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
                       st.integers(-2, 60000), st.floats(allow_nan=False), st.text(max_size=8))
    weird = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
    inputs = st.one_of(weird, st.text(max_size=20), st.lists(st.integers(0, 49151), max_size=6),
                       st.lists(st.lists(st.integers(0, 49151), max_size=4), max_size=3))
    body = st.fixed_dictionaries({}, optional={
        "input": inputs, "text": inputs, "input_ids": inputs,
        "dimensions": st.one_of(st.integers(-2, 600), weird),
        "encoding_format": st.sampled_from(["float", "base64", "hex", 3]), "rid": weird})
    paths = st.sampled_from(["/v1/embeddings", "/encode", "/classify", "/v1/classify"])

    with embed_server.client() as c:
        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(path=paths, payload=body)
        def run(path: str, payload: dict[str, Any]) -> None:
            r = c.post(path, json=payload)
            assert r.status_code in (200, 400), (path, payload, r.status_code, r.text[:200])
            if r.status_code == 400:
                assert r.json()["error"]["message"]

        run()
        assert c.post("/v1/embeddings", json={"input": "after the fuzz"}).status_code == 200
    embed_server.wait_idle()


# --- Ollama's /api/embed ----------------------------------------------------------------

def test_ollama_embed_matches_openai(embed_server: LiveServer, client: openai.OpenAI) -> None:
    ollama = pytest.importorskip("ollama", reason="the ollama client is not installed")
    oc = ollama.Client(host=embed_server.url, headers=embed_server.headers)
    want = client.embeddings.create(model="default", input=TEXTS).data
    got = oc.embed(model="anything", input=TEXTS)
    assert len(got.embeddings) == 3
    assert all(_close(list(g), w.embedding) for g, w in zip(got.embeddings, want))
    assert got.prompt_eval_count == sum(len(smollm2_tokenizer().encode(t)) for t in TEXTS)
    one = oc.embed(model="anything", input=TEXTS[0], dimensions=16)
    head = want[0].embedding[:16]
    norm = math.sqrt(math.fsum(x * x for x in head))
    assert _close(list(one.embeddings[0]), [x / norm for x in head])
    for kwargs, param in [({"input": ""}, "input"), ({"input": []}, "input"),
                          ({"input": "x", "dimensions": 9999}, "dimensions"),
                          ({"input": "word " * 9000, "truncate": False}, "input")]:
        with pytest.raises(ollama.ResponseError) as err:
            oc.embed(model="anything", **kwargs)
        assert err.value.status_code == 400
        _expect_400(embed_server, "/api/embed", kwargs, param)
    embed_server.wait_idle()


def test_ollama_truncate_cuts_to_the_context() -> None:
    from types import SimpleNamespace

    from radixserve.configs.request_limits import RequestLimits
    from radixserve.entrypoints.ollama.embed import _tokenize

    tm = SimpleNamespace(tokenizer=smollm2_tokenizer(), limits=SimpleNamespace(context_len=5),
                         validator=SimpleNamespace(request_limits=RequestLimits()))
    text = "one two three four five six seven eight"
    full = smollm2_tokenizer().encode(text)
    assert len(full) > 5
    assert _tokenize(tm, [text, "hi"], True) == [full[:5], smollm2_tokenizer().encode("hi")]
    assert _tokenize(tm, [text], False) == [full]
