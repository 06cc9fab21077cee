"""Quantized checkpoints (written by tests/quant_checkpoints.py in each format's on-disk
layout) load and run: prefill logits close to HF transformers on the dequantized
weights, and the greedy tokens of the Engine equal HF's. Plus how quantization is
chosen (config.json, --quantization) and the errors for what is not supported.

Tolerances (max |ours - HF| / max |HF| over a prompt's logits): weight-only int4
dequantizes exactly, so it is float rounding (1e-4); FP8 W8A8 also quantizes the
activations (e4m3 keeps 3 mantissa bits), which leaves a few percent (0.06).
"""

from __future__ import annotations

import json

import pytest
import torch

from radixserve.configs.model_config import ModelConfig
from radixserve.engine import Engine
from radixserve.layers.quantization import resolve_quant_config
from radixserve.model_loader import load_model
from radixserve.server_args import ServerArgs
from tests import quant_checkpoints as qc
from tests.test_models import make_checkpoint, max_rel_err, prefill_logits

PROMPT_LENS = (3, 17, 40)
INT4_TOL = 1e-4
FP8_TOL = 0.06
# A larger MLP than test_models' so that groups of 32 and blocks of 32 split every layer.
SIZES = dict(hidden_size=64, intermediate_size=128, head_dim=16)


def _load(path: str, **kwargs) -> tuple[torch.nn.Module, ModelConfig]:
    args = ServerArgs(model_path=path, device="cpu", dtype="float32", **kwargs)
    config = ModelConfig.from_load_config(args.load_config())
    return load_model(args.load_config(), config), config


def _hf_reference(tmp_path, model_type: str = "qwen3") -> torch.nn.Module:
    overrides = dict(SIZES, tie_word_embeddings=False)
    if model_type != "qwen3":
        overrides.pop("head_dim")
    return make_checkpoint(str(tmp_path / "float"), model_type, **overrides)


def _assert_prefill_close(path: str, hf: torch.nn.Module, tol: float, **kwargs) -> None:
    model, config = _load(path, **kwargs)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
               for n in PROMPT_LENS]
    ours = prefill_logits(model, prompts, config.num_hidden_layers,
                          config.num_key_value_heads, config.head_dim)
    for prompt, got in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt])).logits[0]
        err = max_rel_err(got, ref)
        assert err < tol, f"prompt of length {len(prompt)}: relative error {err:.2e}"


def _calibration(hf: torch.nn.Module, prompt: list[int]) -> dict[str, float]:
    """Each projection's largest input magnitude on a prompt (static FP8 calibration)."""
    amax: dict[str, float] = {}
    hooks = [mod.register_forward_pre_hook(
        lambda m, args, name=name: amax.__setitem__(
            name, max(amax.get(name, 0.0), args[0].abs().max().item())))
        for name, mod in qc._projections(hf).items()]
    with torch.inference_mode():
        hf(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return amax


WRITERS = {
    "fp8-block": (lambda hf, p: qc.write_fp8_block(hf, p, (32, 32)), FP8_TOL),
    "compressed-tensors-channel": (qc.write_compressed_tensors_channel, FP8_TOL),
    "compressed-tensors-block": (lambda hf, p: qc.write_compressed_tensors_block(hf, p, (32, 32)),
                                 FP8_TOL),
    "awq": (lambda hf, p: qc.write_awq(hf, p, 32), INT4_TOL),
    "gptq": (lambda hf, p: qc.write_gptq(hf, p, 32, desc_act=False), INT4_TOL),
    "gptq-act-order": (lambda hf, p: qc.write_gptq(hf, p, 32, desc_act=True), INT4_TOL),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_quantized_checkpoint_matches_dequantized_hf(tmp_path, fmt: str) -> None:
    hf = _hf_reference(tmp_path)
    write, tol = WRITERS[fmt]
    path = str(tmp_path / fmt)
    write(hf, path)
    _assert_prefill_close(path, hf, tol)


def test_fp8_static_per_tensor_scales(tmp_path) -> None:
    """Per-tensor weight scales differ between q, k and v (and gate, up): each shard of a
    packed layer keeps its own; static input scales take their maximum."""
    hf = _hf_reference(tmp_path, "llama")
    gen = torch.Generator().manual_seed(5)
    calib = _calibration(hf, torch.randint(0, 512, (40,), generator=gen).tolist())
    path = str(tmp_path / "fp8-static")
    qc.write_fp8_per_tensor_static(hf, path, {k: 2 * v for k, v in calib.items()})
    _assert_prefill_close(path, hf, FP8_TOL)
    model, _ = _load(path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    q_rows, kv_rows = qkv.q_size, qkv.kv_size
    scales = qkv.weight_scale.flatten()
    assert torch.all(scales[:q_rows] == scales[0])
    assert scales[0] != scales[q_rows] and scales[q_rows] != scales[q_rows + kv_rows]
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert qkv.input_scale.item() == pytest.approx(max(2 * calib[n] for n in names) / 448)


def test_online_fp8_of_a_float_checkpoint(tmp_path) -> None:
    hf = _hf_reference(tmp_path)
    path = str(tmp_path / "float")
    _assert_prefill_close(path, hf, FP8_TOL, quantization="fp8")
    model, _ = _load(path, quantization="w8a8_fp8")
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (64, 1)


def _hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _generate(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    engine = Engine(model_path=path, max_total_tokens=1024, skip_tokenizer_init=True,
                    dtype="float32", device="cpu")
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0, "max_new_tokens": n, "ignore_eos": True})
    finally:
        engine.shutdown()
    return [out["output_ids"] for out in outs]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (4, 21)]


@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order"])
def test_engine_greedy_equals_dequantized_hf_int4(tmp_path, fmt: str) -> None:
    hf = _hf_reference(tmp_path)
    path = str(tmp_path / fmt)
    WRITERS[fmt][0](hf, path)
    prompts = _prompts()
    for prompt, out in zip(prompts, _generate(path, prompts, 12)):
        assert out == _hf_greedy(hf, prompt, 12), fmt


def test_engine_greedy_fp8_follows_dequantized_hf(tmp_path) -> None:
    """W8A8 moves logits by up to FP8_TOL of their range, which on a random model can
    flip a near tie (a random model's top two are often that close). So each of our
    greedy tokens must be HF's argmax on the same prefix wherever HF's top-two gap
    exceeds twice that bound, and a third of the steps at least must be such; the
    perplexity test on the real model (test_quant_smollm2.py) is the stronger check."""
    hf = _hf_reference(tmp_path)
    path = str(tmp_path / "fp8")
    WRITERS["fp8-block"][0](hf, path)
    prompts = _prompts()
    decisive = total = 0
    for prompt, out in zip(prompts, _generate(path, prompts, 12)):
        seq = list(prompt)
        for token in out:
            with torch.no_grad():
                logits = hf(torch.tensor([seq])).logits[0, -1]
            top2 = logits.topk(2).values
            if top2[0] - top2[1] > 2 * FP8_TOL * logits.abs().max():
                assert token == int(logits.argmax()), f"step {len(seq) - len(prompt)}"
                decisive += 1
            total += 1
            seq.append(token)
    assert decisive >= total // 3, f"only {decisive} of {total} steps were decisive"


def test_ignored_modules_stay_float(tmp_path) -> None:
    hf = _hf_reference(tmp_path)
    path = str(tmp_path / "ct")
    qc.write_compressed_tensors_channel(hf, path)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    # Keep layer 1's MLP in float: its tensors are the float ones.
    config["quantization_config"]["ignore"] += ["re:model\\.layers\\.1\\.mlp\\..*"]
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{path}/model.safetensors")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.1.mlp.{proj}"
        del tensors[f"{name}.weight_scale"]
        tensors[f"{name}.weight"] = hf.get_submodule(name).weight.data.clone()
    save_file(tensors, f"{path}/model.safetensors")
    model, _ = _load(path)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    _assert_prefill_close(path, hf, FP8_TOL)


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3 bits"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "'e5m2'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "int", "num_bits": 4},
        "input_activations": None}}}, "type 'int' with 4 bits"),
])
def test_unsupported_checkpoint_quantization_is_named(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_quant_config(None, cfg)


def test_flag_and_checkpoint_must_agree() -> None:
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert resolve_quant_config("w8a8_fp8", fp8).block == (128, 128)
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization "
                                         "method 'fp8'"):
        resolve_quant_config("awq", fp8)
    with pytest.raises(ValueError, match="awq needs a checkpoint quantized with it"):
        resolve_quant_config("awq", None)
    assert resolve_quant_config(None, None) is None


def test_unsupported_checkpoint_fails_at_load_with_its_name(tmp_path) -> None:
    _hf_reference(tmp_path)
    path = tmp_path / "float"
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'hqq'"):
        _load(str(path))


def test_quantization_flag_is_checked_before_loading(capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])
    assert "--quantization: invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantization must be one of"):
        ServerArgs(model_path="x", quantization="int3")


@pytest.mark.parametrize("qcfg", [
    {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
    {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True},
])
def test_dummy_weights_of_a_quantized_config_run(tmp_path, qcfg: dict) -> None:
    """--load-format dummy (the GPU benchmarks) fills quantized tensors with codes and
    scales that keep activations finite."""
    _hf_reference(tmp_path)
    path = tmp_path / "float"
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(config))
    model, cfg = _load(str(path), load_format="dummy")
    (logits,) = prefill_logits(model, [[1, 2, 3, 4]], cfg.num_hidden_layers,
                               cfg.num_key_value_heads, cfg.head_dim)
    assert torch.isfinite(logits).all() and logits.std() > 0
