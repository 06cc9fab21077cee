"""Weight loading: HF folders (single and sharded safetensors), GGUF, dummy weights,
the tokenizer and chat template, and the errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from radixserve.configs.gguf_config import open_gguf
from radixserve.configs.load_config import LoadConfig
from radixserve.configs.model_config import ModelConfig, head_dim_of
from radixserve.model_loader import get_tokenizer, load_model
from radixserve.server_args import ServerArgs
from tests.test_models import (assert_matches_hf, load_ours, make_checkpoint, max_rel_err,
                               prefill_logits)

SMOLLM2 = ServerArgs(device="cpu", dtype="float32").model_path
PROMPT = "The quick brown fox jumps over the lazy dog because"


def _args(path: str, **kw) -> ServerArgs:
    return ServerArgs(model_path=path, device="cpu", dtype="float32", **kw)


def _load(path: str, **kw) -> LoadConfig:
    return _args(path, **kw).load_config()


def _rewrite(path: str, edit) -> None:
    """Apply `edit` to the tensors dict of the folder's model.safetensors."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_sharded_safetensors_load(tmp_path) -> None:
    hf = make_checkpoint(str(tmp_path / "full"), "qwen3", head_dim=32)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    shards = [n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors")]
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_matches_hf(str(tmp_path / "sharded"), hf)
    # The shards read ahead in a thread give every tensor once, in file order, as the
    # lazy one-file-at-a-time reads do; a reader abandoned half-way stops cleanly.
    from radixserve.model_loader.safetensors_loader import iterate_safetensors

    ahead = list(iterate_safetensors(str(tmp_path / "sharded")))
    in_order = [(n, t.full()) for n, t in iterate_safetensors(str(tmp_path / "sharded"),
                                                                lazy=True)]
    assert [n for n, _ in ahead] == [n for n, _ in in_order]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ahead, in_order))
    partial = iterate_safetensors(str(tmp_path / "sharded"))
    next(partial)
    partial.close()


def test_missing_tensor_is_named(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama")
    _rewrite(str(tmp_path), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj"):
        load_ours(str(tmp_path))


def test_misshaped_tensor_is_named(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama")
    _rewrite(str(tmp_path), lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(7, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(7, 64\)"):
        load_ours(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama")
    _rewrite(str(tmp_path), lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.extra\.weight'\]"):
        load_ours(str(tmp_path))


def test_truncated_file_is_named(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama")
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_ours(str(tmp_path))


def test_shard_missing_an_indexed_tensor_is_named(tmp_path) -> None:
    hf = make_checkpoint(str(tmp_path / "full"), "llama")
    path = tmp_path / "sharded"
    hf.save_pretrained(str(path), max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(path / shard))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_ours(str(path))


def test_unknown_architecture(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FooForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_ours(str(tmp_path))


def test_dummy_weights_from_config_alone(tmp_path) -> None:
    make_checkpoint(str(tmp_path / "ckpt"), "qwen2")
    os.makedirs(tmp_path / "cfg")
    shutil.copy(tmp_path / "ckpt" / "config.json", tmp_path / "cfg" / "config.json")
    args = _args(str(tmp_path / "cfg"), load_format="dummy")
    load = args.load_config()
    config = ModelConfig.from_load_config(load)
    first, second = load_model(load, config), load_model(load, config)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two seeded dummy loads"
    logits = prefill_logits(first, [[1, 2, 3]], 2, 2, 16)[0]
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_model_config_reads_generation_config(tmp_path) -> None:
    make_checkpoint(str(tmp_path), "llama", eos_token_id=2)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    config = ModelConfig.from_load_config(_load(str(tmp_path)))
    assert config.eos_token_ids == {2, 7}
    assert config.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert config.context_len == 256 and config.head_dim == 16
    assert config.architecture == "LlamaForCausalLM" and not config.tie_word_embeddings
    assert ModelConfig.from_load_config(_load(str(tmp_path), context_length=100)).context_len == 100


# --- GGUF -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair():
    args = ServerArgs(device="cpu", dtype="float32")  # no path: the default model
    config = ModelConfig.from_load_config(args.load_config())
    ours = load_model(args.load_config(), config)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOLLM2),
                                              gguf_file=os.path.basename(SMOLLM2),
                                              dtype=torch.float32).eval()
    return ours, hf, config


@pytest.fixture(scope="module")
def gguf_tokenizer():
    return get_tokenizer(ServerArgs(device="cpu").load_config())


@pytest.fixture(scope="module")
def tokenizer_dir(gguf_tokenizer, tmp_path_factory) -> str:
    """The GGUF tokenizer saved as an HF folder: the folder path of get_tokenizer."""
    path = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer.save_pretrained(str(path))
    return str(path)


def test_smollm2_config_from_gguf_metadata(smollm2_pair) -> None:
    _, _, config = smollm2_pair
    assert (config.architecture, config.num_hidden_layers, config.hidden_size) == (
        "LlamaForCausalLM", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.context_len == 8192 and config.eos_token_ids == {2}


def assert_weights_equal(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    """Every parameter of ours equals the HF-named tensors it packs."""
    packs = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, param in model.named_parameters():
        parts = next((p for packed, p in packs.items() if f".{packed}." in name), None)
        if parts is None:
            expected = ref[name]
        else:
            packed = next(k for k in packs if f".{k}." in name)
            expected = torch.cat([ref[name.replace(packed, p)] for p in parts])
        assert torch.equal(param, expected), name


def test_smollm2_weights_equal_transformers_gguf_loading(smollm2_pair) -> None:
    ours, hf, _ = smollm2_pair
    assert_weights_equal(ours, hf.state_dict())


def test_smollm2_prefill_logits_match_transformers(smollm2_pair, gguf_tokenizer) -> None:
    ours, hf, config = smollm2_pair
    ids = gguf_tokenizer(PROMPT)["input_ids"]
    got = prefill_logits(ours, [ids], config.num_hidden_layers, config.num_key_value_heads,
                         config.head_dim)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert max_rel_err(got, ref) < 1e-4


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama Q/K rows (pairs interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def _write_tiny_gguf(path: str, hf: torch.nn.Module, arch: str,
                     qtype: gguf.GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """`hf` as a GGUF of `arch` (tied embeddings); returns the HF-named weights the
    loader must produce (each quantized and dequantized)."""
    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim_of(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(2)
    expected = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        original = t.numpy()
        kind = qtype if original.ndim == 2 else gguf.GGMLQuantizationType.F32
        stored = original
        if arch == "llama" and name.endswith("q_proj.weight"):
            stored = _llama_cpp_permute(original, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            stored = _llama_cpp_permute(original, c.num_key_value_heads)
        w.add_tensor(_gguf_name(name), gguf.quants.quantize(stored, kind), raw_dtype=kind)
        # Quantization blocks lie within rows, so quantizing the unpermuted rows gives
        # what the loader must return after undoing the permutation.
        restored = gguf.quants.dequantize(gguf.quants.quantize(original, kind), kind)
        expected[name] = torch.from_numpy(restored.reshape(original.shape).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "F16"),
                                        ("llama", "BF16"), ("qwen2", "Q4_1"), ("qwen3", "F16")])
def test_tiny_gguf_round_trip(tmp_path, arch: str, qtype: str) -> None:
    extra = {"qwen3": {"head_dim": 32}}.get(arch, {})
    hf = make_checkpoint(str(tmp_path / "hf"), arch, tie_word_embeddings=True, **extra)
    path = str(tmp_path / "tiny.gguf")
    expected = _write_tiny_gguf(path, hf, arch, getattr(gguf.GGMLQuantizationType, qtype))
    model, config = load_ours(path)
    assert config.architecture == type(hf).__name__ and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.head_dim, config.eos_token_ids) == (
        2, head_dim_of(hf.config), {2})
    assert_weights_equal(model, expected)
    if qtype in ("F16", "BF16"):  # close to the float32 weights: still HF's model
        got = prefill_logits(model, [list(range(1, 30))], 2, 2, config.head_dim)[0]
        with torch.inference_mode():
            want = hf(torch.arange(1, 30)[None]).logits[0]
        assert max_rel_err(got, want) < 2e-2


def test_truncated_gguf_is_named(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(open(SMOLLM2, "rb").read(4096))
    with pytest.raises(ValueError, match="bad.gguf"):
        load_ours(str(bad))


# --- tokenizer -----------------------------------------------------------------------


def test_gguf_tokenizer_and_chat_template(gguf_tokenizer) -> None:
    reader = open_gguf(SMOLLM2)  # cached: already parsed by the model load
    assert gguf_tokenizer.chat_template == reader.fields["tokenizer.chat_template"].contents()
    text = gguf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                              tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = gguf_tokenizer("Hello world")["input_ids"]
    assert gguf_tokenizer.decode(ids) == "Hello world"


def test_chat_template_override(tmp_path, tokenizer_dir) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    tok = get_tokenizer(_load(tokenizer_dir, chat_template="{{ messages[0]['content'] }}!"))
    assert tok.apply_chat_template(msgs, tokenize=False) == "Hi!"
    (tmp_path / "t.jinja").write_text("<{{ messages[0]['role'] }}>")
    tok = get_tokenizer(_load(tokenizer_dir, chat_template=str(tmp_path / "t.jinja")))
    assert tok.apply_chat_template(msgs, tokenize=False) == "<user>"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        get_tokenizer(_load(tokenizer_dir, chat_template=str(tmp_path / "missing.jinja")))
