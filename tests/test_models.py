"""Model parity: our prefill logits equal HF transformers' on tiny random checkpoints
of every supported architecture; plus the layers' TP weight slicing and the registry."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from radixserve.configs.model_config import ModelConfig
from radixserve.core.forward_batch import ForwardBatch, ForwardMode
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from radixserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                      RowParallelLinear)
from radixserve.layers.rotary_embedding import rope_params
from radixserve.layers.vocab_embedding import VocabParallelEmbedding
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from radixserve.model_loader import load_model
from radixserve.models.registry import get_model_class, supported_architectures
from radixserve.server_args import ServerArgs

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=256, rms_norm_eps=1e-6)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "llama-llama3-untied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),
}

PROMPT_LENS = (1, 5, 17, 40)


def make_checkpoint(path: str, model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random float32 HF checkpoint at `path`; return the HF model."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random norms and biases too, so a loader that skipped them would be caught.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    hf.save_pretrained(path)
    return hf


def prefill_logits(model: torch.nn.Module, prompts: list[list[int]], num_layers: int,
                   num_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Run all prompts as one EXTEND batch with no cached prefix; logits per prompt."""
    param = next(model.parameters())
    dev = param.device
    lens = [len(p) for p in prompts]
    total = sum(lens)
    req_pool = ReqToTokenPool(len(prompts), max(lens), dev)
    kv_pool = MHATokenToKVPool(total, param.dtype, num_kv_heads, head_dim, num_layers, dev)
    slots = torch.arange(1, total + 1, device=dev)  # slot 0 is reserved for padding
    start = 0
    for row, n in enumerate(lens):
        req_pool.write(row, 0, slots[start:start + n])
        start += n
    lens_t = torch.tensor(lens, device=dev)
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(prompts),
        input_ids=torch.tensor([t for p in prompts for t in p], device=dev),
        positions=torch.cat([torch.arange(n, device=dev) for n in lens]),
        req_pool_indices=torch.arange(len(prompts), device=dev), seq_lens=lens_t,
        out_cache_loc=slots,
        seq_lens_cpu=lens, req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
        attn_backend=TorchNativeAttnBackend(), extend_prefix_lens=torch.zeros_like(lens_t),
        extend_seq_lens=lens_t, extend_start_loc=torch.cumsum(lens_t, 0) - lens_t,
        extend_prefix_lens_cpu=[0] * len(prompts), extend_seq_lens_cpu=lens)
    fb.attn_backend.init_forward_metadata(fb)
    with torch.inference_mode():
        logits = model.compute_logits(model(fb.input_ids, fb.positions, fb))
    return list(logits.split(lens))


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def load_ours(path: str) -> tuple[torch.nn.Module, ModelConfig]:
    args = ServerArgs(model_path=path, device="cpu", dtype="float32")
    config = ModelConfig.from_load_config(args.load_config())
    return load_model(args.load_config(), config), config


def assert_matches_hf(path: str, hf: torch.nn.Module, seed: int = 1) -> None:
    model, config = load_ours(path)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
               for n in PROMPT_LENS]
    ours = prefill_logits(model, prompts, config.num_hidden_layers,
                          config.num_key_value_heads, config.head_dim)
    for prompt, got in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert max_rel_err(got, ref) < 1e-4, f"prompt of length {len(prompt)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match_hf(tmp_path, case: str) -> None:
    model_type, overrides = CASES[case]
    hf = make_checkpoint(str(tmp_path), model_type, **overrides)
    assert_matches_hf(str(tmp_path), hf)


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated")
def test_old_style_rope_config_is_read() -> None:
    config = AutoConfig.for_model("llama", **TINY)
    config.rope_parameters = None
    config.rope_theta = 5e5
    config.rope_scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    theta, scaling = rope_params(config)
    assert theta == 5e5 and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0


def test_packed_layers_slice_per_tp_rank() -> None:
    """Two ranks' slices of the packed projections reassemble the full tensors."""
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)  # 4 heads, 2 kv, d=2
    gate, up, down = torch.randn(10, 6), torch.randn(10, 6), torch.randn(6, 10)
    qkv_parts, gu_parts, down_parts = [], [], []
    for rank in range(2):
        qkv = QKVParallelLinear(6, 2, 4, 2, tp_rank=rank, tp_size=2)
        for shard, w in (("q", q), ("k", k), ("v", v)):
            qkv.weight_loader(qkv.weight, w, shard)
        qkv_parts.append(qkv.weight.split([qkv.q_size, qkv.kv_size, qkv.kv_size]))
        gu = MergedColumnParallelLinear(6, [10, 10], tp_rank=rank, tp_size=2)
        gu.weight_loader(gu.weight, gate, 0)
        gu.weight_loader(gu.weight, up, 1)
        gu_parts.append(gu.weight.chunk(2))
        row = RowParallelLinear(10, 6, tp_rank=rank, tp_size=2)
        row.weight_loader(row.weight, down)
        down_parts.append(row.weight)
    for i, full in enumerate((q, k, v)):
        assert torch.equal(torch.cat([p[i] for p in qkv_parts]), full)
    for i, full in enumerate((gate, up)):
        assert torch.equal(torch.cat([p[i] for p in gu_parts]), full)
    assert torch.equal(torch.cat(down_parts, dim=1), down)


def test_kv_heads_replicate_when_fewer_than_ranks() -> None:
    k = torch.randn(4, 6)  # 2 kv heads of dim 2 over 4 ranks: ranks 0,1 share head 0
    slices = []
    for rank in range(4):
        qkv = QKVParallelLinear(6, 2, 4, 2, tp_rank=rank, tp_size=4)
        qkv.weight_loader(qkv.weight, k, "k")
        slices.append(qkv.weight[qkv.q_size:qkv.q_size + qkv.kv_size])
    assert torch.equal(slices[0], k[:2]) and torch.equal(slices[1], k[:2])
    assert torch.equal(slices[2], k[2:]) and torch.equal(slices[3], k[2:])


def test_vocab_split_pads_last_rank() -> None:
    emb = torch.randn(5, 3)
    last = VocabParallelEmbedding(5, 3, tp_rank=1, tp_size=2)
    last.weight_loader(last.weight, emb)
    assert torch.equal(last.weight[:2], emb[3:]) and not last.weight[2].any()


def test_wrong_shape_names_the_expected_shape() -> None:
    layer = MergedColumnParallelLinear(6, [10, 10])
    with pytest.raises(ValueError, match=r"\(9, 6\).*\(10, 6\)"):
        layer.weight_loader(layer.weight, torch.randn(9, 6), 1)


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(ValueError) as e:
        get_model_class("FooForCausalLM")
    for arch in supported_architectures():
        assert arch in str(e.value)
    assert set(supported_architectures()) >= {"LlamaForCausalLM", "MistralForCausalLM",
                                               "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
