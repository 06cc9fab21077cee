"""Quantized checkpoints written the way their tools write them, for the loaders' tests.

Each writer takes a float HF model, quantizes every decoder projection with the format's
own packing (written out here as the format's documentation states it, independently of
radixserve's unpacking), saves safetensors plus a config.json carrying the format's
quantization_config, and puts the dequantized weights back into the HF model, which then
is the float reference the quantized model must match.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i holds column order[i]


def _projections(hf: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in hf.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ}


def _save(hf: torch.nn.Module, path: str, tensors: dict[str, torch.Tensor],
          quantization_config: dict) -> None:
    """Everything but the quantized projections as float, plus `tensors`; config.json
    gains the quantization_config."""
    quantized = {f"{n}.weight" for n in _projections(hf)}
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k not in quantized}
    state.update({k: v.contiguous() for k, v in tensors.items()})
    if getattr(hf.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def write_fp8_block(hf: torch.nn.Module, path: str, block: tuple[int, int]) -> None:
    """quant_method fp8 with weight_block_size (DeepSeek-V3 / Qwen3-FP8): weight e4m3,
    weight_scale_inv [ceil(N / bn), ceil(K / bk)] multiplied in."""
    bn, bk = block
    tensors = {}
    for name, mod in _projections(hf).items():
        w = mod.weight.data.float()
        n, k = w.shape
        scale = torch.empty(-(-n // bn), -(-k // bk))
        q = torch.empty(n, k, dtype=FP8)
        deq = torch.empty(n, k)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
                qb = (blk / s).to(FP8)
                scale[i, j] = s
                q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb
                deq[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb.float() * s
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale_inv"] = scale
        mod.weight.data.copy_(deq)
    _save(hf, path, tensors, {"quant_method": "fp8", "fmt": "e4m3",
                              "activation_scheme": "dynamic",
                              "weight_block_size": list(block)})


def write_compressed_tensors_block(hf: torch.nn.Module, path: str,
                                   block: tuple[int, int]) -> None:
    """llm-compressor FP8_BLOCK: block weight scales named weight_scale, activations
    dynamic per token and group of bk."""
    write_fp8_block(hf, path, block)
    from safetensors.torch import load_file

    tensors = {k.replace("weight_scale_inv", "weight_scale"): v
               for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
              "strategy": "block", "block_structure": list(block)}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
            "strategy": "group", "group_size": block[1]}
    quantized = {k for k in tensors if k.rsplit(".", 2)[-2] in PROJ}
    _save(hf, path, {k: tensors[k] for k in quantized}, {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": scheme, "input_activations": acts}}})


def write_fp8_per_tensor_static(hf: torch.nn.Module, path: str,
                                calibration: dict[str, float]) -> None:
    """quant_method fp8, activation_scheme static: one weight_scale and one input_scale
    per projection (scalars)."""
    tensors = {}
    for name, mod in _projections(hf).items():
        w = mod.weight.data.float()
        s = w.abs().max() / FP8_MAX
        q = (w / s).to(FP8)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = s.reshape(())
        tensors[f"{name}.input_scale"] = torch.tensor(calibration[name] / FP8_MAX)
        mod.weight.data.copy_(q.float() * s)
    _save(hf, path, tensors, {"quant_method": "fp8", "activation_scheme": "static"})


def write_compressed_tensors_channel(hf: torch.nn.Module, path: str) -> None:
    """llm-compressor FP8_DYNAMIC: per-channel weight_scale [N, 1], dynamic per-token
    activations; lm_head ignored."""
    tensors = {}
    for name, mod in _projections(hf).items():
        w = mod.weight.data.float()
        s = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        q = (w / s).to(FP8)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = s.to(torch.bfloat16)
        mod.weight.data.copy_(q.float() * s.to(torch.bfloat16).float())
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
              "strategy": "channel", "group_size": None, "block_structure": None}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
            "strategy": "token", "group_size": None, "block_structure": None}
    _save(hf, path, tensors, {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                      "input_activations": acts, "output_activations": None}}})


def _rtn_int4(w_t: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest of w_t [K, N] per group of `group` input rows:
    (q [K, N] in 0..15, zeros [K/G, N] in 0..15, scales [K/G, N] fp16)."""
    k, n = w_t.shape
    g = w_t.reshape(k // group, group, n)
    lo, hi = g.amin(1), g.amax(1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-lo / scales.float()).round().clamp(0, 15)
    q = (g / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
    return q.int(), zeros.int(), scales


def write_awq(hf: torch.nn.Module, path: str, group: int) -> None:
    """AutoAWQ GEMM: qweight [K, N/8], qzeros [K/G, N/8] packed in AWQ's order map,
    scales [K/G, N] fp16 (as WQLinear_GEMM.from_linear packs them)."""
    tensors = {}
    for name, mod in _projections(hf).items():
        w_t = mod.weight.data.float().t().contiguous()  # [K, N]
        q, zeros, scales = _rtn_int4(w_t, group)
        k, n = q.shape
        qweight = torch.zeros(k, n // 8, dtype=torch.int32)
        qzeros = torch.zeros(k // group, n // 8, dtype=torch.int32)
        for col in range(n // 8):
            for i in range(8):
                qweight[:, col] |= q[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
                qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.qzeros"] = qzeros
        tensors[f"{name}.scales"] = scales
        gi = torch.arange(k) // group
        deq = (q.float() - zeros.float()[gi]) * scales.float()[gi]
        mod.weight.data.copy_(deq.t())
    _save(hf, path, tensors, {"quant_method": "awq", "bits": 4, "group_size": group,
                              "zero_point": True, "version": "gemm",
                              "modules_to_not_convert": None})


def write_gptq(hf: torch.nn.Module, path: str, group: int, desc_act: bool,
               seed: int = 0) -> None:
    """GPTQ (AutoGPTQ v1 format): qweight [K/8, N] packed along K, qzeros [groups, N/8]
    storing zero - 1, scales [groups, N] fp16, g_idx [K]. With desc_act the input rows
    are assigned to groups in a random order (as act-order's column permutation does);
    projections of one input (q, k, v; gate, up) share it, as their Hessian is the same."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    perms: dict[str, torch.Tensor] = {}
    for name, mod in _projections(hf).items():
        w_t = mod.weight.data.float().t().contiguous()  # [K, N]
        k, n = w_t.shape
        same_input = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj") \
            .replace("up_proj", "gate_proj")
        if same_input not in perms:
            perms[same_input] = (torch.randperm(k, generator=gen) if desc_act
                                 else torch.arange(k))
        perm = perms[same_input]
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).int()  # row perm[j] is in group j // G
        q_sorted, zeros, scales = _rtn_int4(w_t[perm], group)
        q = torch.empty_like(q_sorted)
        q[perm] = q_sorted
        qweight = torch.zeros(k // 8, n, dtype=torch.int32)
        for row in range(k // 8):
            for j in range(8):
                qweight[row] |= q[row * 8 + j] << (4 * j)
        qzeros = torch.zeros(k // group, n // 8, dtype=torch.int32)
        stored = (zeros - 1) & 0xF
        for col in range(n // 8):
            for j in range(8):
                qzeros[:, col] |= stored[:, col * 8 + j] << (4 * j)
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.qzeros"] = qzeros
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx
        gl = g_idx.long()
        # GPTQ's dequantization: zero = stored + 1.
        deq = (q.float() - (stored.float()[gl] + 1)) * scales.float()[gl]
        mod.weight.data.copy_(deq.t())
    _save(hf, path, tensors, {"quant_method": "gptq", "bits": 4, "group_size": group,
                              "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"})
