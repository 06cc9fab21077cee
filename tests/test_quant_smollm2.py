"""The default model (SmolLM2-135M-Instruct, real weights) quantized: perplexity on a
fixed passage, for FP8 W8A8 quantized at load and for an int4 AWQ checkpoint
(round-to-nearest, group 64: the hidden size 576 is not a multiple of 128) written from
the same float weights.

What the engine owns is checked strictly: the int4 model's perplexity equals HF's on the
dequantized weights, and FP8's activation quantization adds at most 5% to HF's on the
FP8-rounded weights. The issue's targets against the float model are not met on this
small model, by the weight rounding itself (docs/quantization.md has the measured
figures): no test claims them.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from radixserve.configs.model_config import ModelConfig
from radixserve.layers.quantization import fp8_ops
from radixserve.model_loader import load_model
from radixserve.server_args import ServerArgs
from tests import quant_checkpoints as qc
from tests.model_factory import smollm2_gguf_path, smollm2_tokenizer
from tests.test_models import prefill_logits

PASSAGE = (
    "The river rose slowly through the night, and by morning the low fields beside the "
    "village were under water. The farmers had moved their animals to the hill the day "
    "before, so no lives were lost, but the harvest that had not yet been brought in was "
    "ruined. In the weeks that followed, the people of the village worked together to "
    "clear the mud from their houses and to repair the broken fences. The old mill, which "
    "had stood by the river for two hundred years, was damaged beyond repair, and the "
    "council decided to build a new one further from the bank.")


def _ppl_of_logits(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


def _ours(path: str, ids: list[int], **kwargs) -> float:
    args = ServerArgs(model_path=path, device="cpu", dtype="float32", **kwargs)
    config = ModelConfig.from_load_config(args.load_config())
    model = load_model(args.load_config(), config)
    (logits,) = prefill_logits(model, [ids], config.num_hidden_layers,
                               config.num_key_value_heads, config.head_dim)
    return _ppl_of_logits(logits, ids)


def _hf(hf: torch.nn.Module, ids: list[int]) -> float:
    with torch.inference_mode():
        return _ppl_of_logits(hf(torch.tensor([ids])).logits[0], ids)


@pytest.fixture(scope="module")
def ppl(tmp_path_factory) -> dict[str, float]:
    """Perplexities: float (ours), fp8 and int4 (ours), and HF on the FP8-rounded and the
    int4-dequantized weights."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                              gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    if hasattr(hf.config, "quantization_config"):  # the GGUF origin: not ours to keep
        del hf.config.quantization_config
    hf.config.architectures = ["LlamaForCausalLM"]
    path = str(tmp_path_factory.mktemp("smollm2-float"))
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(path, "model.safetensors"))
    hf.config.to_json_file(os.path.join(path, "config.json"))
    ids = smollm2_tokenizer().encode(PASSAGE)
    out = {"float": _ours(path, ids), "fp8": _ours(path, ids, quantization="fp8")}
    rounded = copy.deepcopy(hf)
    for mod in qc._projections(rounded).values():
        w_q, scale = fp8_ops.quantize_weight_per_channel(mod.weight.data)
        mod.weight.data.copy_(w_q.float() * scale)
    out["hf_fp8_weights"] = _hf(rounded, ids)
    awq = str(tmp_path_factory.mktemp("smollm2-awq"))
    qc.write_awq(hf, awq, 64)  # hf now holds the dequantized int4 weights
    out["int4"] = _ours(awq, ids)
    out["hf_int4_weights"] = _hf(hf, ids)
    return out


def test_float_model_reads_english(ppl) -> None:
    assert ppl["float"] < 40, ppl


def test_int4_perplexity_equals_dequantized_reference(ppl) -> None:
    assert ppl["int4"] == pytest.approx(ppl["hf_int4_weights"], rel=1e-4), ppl


def test_fp8_activation_quantization_costs_little(ppl) -> None:
    assert ppl["hf_fp8_weights"] <= ppl["fp8"] * 1.01, ppl  # no better than its weights
    assert ppl["fp8"] <= 1.05 * ppl["hf_fp8_weights"], ppl
