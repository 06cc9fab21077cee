"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers."""

from __future__ import annotations

import os

import pytest
import torch

from radixserve.engine import Engine
from tests.model_factory import smollm2_gguf_path, smollm2_tokenizer

NEW_TOKENS = 24
RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def engine():
    eng = Engine(max_total_tokens=8192)  # no model path: the default model
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
    return model.eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_default_model_matches_hf(engine, hf_model):
    tok = smollm2_tokenizer()
    chat_ids = engine.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    prompts = [tok.encode(p) for p in RAW_PROMPTS] + [chat_ids]
    outs = engine.generate(input_ids=prompts, sampling_params={
        "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
    for ids, out in zip(prompts, outs):
        assert out["output_ids"] == _hf_greedy(hf_model, ids, NEW_TOKENS), tok.decode(ids)
    # Sensible English from a real model: the chat answer names the city.
    assert "Paris" in outs[-1]["text"]


def test_default_model_chat_stops_at_eos(engine):
    out = engine.chat([{"role": "user", "content": "Say hello."}],
                      {"temperature": 0, "max_new_tokens": 64})
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert out["text"].strip()
    assert "<|im_end|>" not in out["text"]
