"""The floors of bench/floor.py on tiny dense and MoE models, and --compare-hf of
bench.one_batch and bench.offline_throughput end to end on a tiny Qwen3-MoE (CPU): HF
is only ever built once none of our runners is alive."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from radixserve.bench import hf_baseline, offline_throughput, one_batch
from radixserve.bench.floor import (decode_weight_bytes, expected_experts_hit,
                                    model_flops_per_token)
from radixserve.configs.model_config import ModelConfig
from radixserve.layers.moe import FusedMoE
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.models.registry import get_model_class
from tests.model_factory import ARCHS, tiny_config
from tests.moe_factory import MOE_ARCHS, make_tiny_moe_checkpoint, one_thread  # noqa: F401
from tests.moe_factory import tiny_moe_config


def _model(config) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    model = get_model_class(config.architectures[0])(config)
    return model, ModelConfig(model_path="tiny", hf_config=config, dtype=torch.float32,
                              context_len=1024)


def _config(arch: str):
    config = tiny_moe_config(arch) if arch in MOE_ARCHS else tiny_config(arch)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def test_expected_experts_hit() -> None:
    assert expected_experts_hit(128, 8, 1) == pytest.approx(8)
    assert expected_experts_hit(128, 8, 2) == pytest.approx(8 + 8 * 120 / 128)
    assert expected_experts_hit(128, 8, 64) == pytest.approx(125.9, abs=0.1)
    assert expected_experts_hit(128, 8, 4096) == pytest.approx(128)


def test_moe_decode_bytes_at_batch_1_are_the_hand_count() -> None:
    """Qwen3-MoE, float32: attention + q/k norms + layer norms + router + top_k of the
    experts per layer, the final norm and the untied LM head; no embedding."""
    cfg = tiny_moe_config("qwen3-moe")
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    model, mc = _model(cfg)
    h, d, heads, kv = 64, 32, 4, 2
    e, k, inter, vocab, layers = 8, 3, 32, 49152, 2
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.num_hidden_layers) == (h, d, e, k, inter, layers)
    attention = h * (heads + 2 * kv) * d + heads * d * h + 2 * d
    per_layer = attention + 2 * h + h * e + k * 3 * h * inter
    expected = 4 * (layers * per_layer + h + vocab * h)
    assert decode_weight_bytes(model, mc, 1) == pytest.approx(expected)
    # Many tokens reach every expert: all weights but the embedding.
    everything = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed" not in n)
    assert decode_weight_bytes(model, mc, 10_000) == pytest.approx(everything)
    by_batch = [decode_weight_bytes(model, mc, b) for b in (1, 2, 8, 64)]
    assert by_batch == sorted(by_batch) and by_batch[-1] < everything


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_floor_is_unchanged(arch: str) -> None:
    """Every weight but an untied embedding at any batch, and the dense FLOP formula."""
    model, mc = _model(_config(arch))
    seen, old_bytes = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or ("embed_tokens" in name and not mc.tie_word_embeddings):
            continue
        seen.add(p.data_ptr())
        old_bytes += p.numel() * p.element_size()
    assert decode_weight_bytes(model, mc, 1) == old_bytes
    assert decode_weight_bytes(model, mc, 256) == old_bytes
    h, q, kv = mc.hidden_size, mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * mc.hf_config.intermediate_size
    assert model_flops_per_token(mc) == 2.0 * (mc.num_hidden_layers * per_layer + h * mc.vocab_size)


@pytest.mark.parametrize("arch", MOE_ARCHS + ["llama-tied", "qwen3"])
def test_flops_count_the_matrices_a_token_touches(arch: str) -> None:
    """The config-based count equals 2 × the model's own matrices, routed experts
    scaled by top_k / E (norms, biases and V3's score bias are not matmuls; the input
    embedding is a lookup unless it is the tied LM head). Covers Qwen2-MoE's shared
    expert and dense layer, DeepSeek's MLA, shared experts and first dense layer."""
    model, mc = _model(_config(arch))
    experts = {id(p): m.num_experts for m in model.modules() if isinstance(m, FusedMoE)
               for p in m.parameters(recurse=False)}
    top_k = getattr(mc.hf_config, "num_experts_per_tok", 0)
    seen, weights = set(), 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if "embed_tokens" in name and not mc.tie_word_embeddings:
            continue
        weights += p.numel() * (top_k / experts[id(p)] if id(p) in experts else 1.0)
    assert model_flops_per_token(mc) == pytest.approx(2 * weights)


def _live_runners() -> int:
    gc.collect()
    return sum(type(o) is ModelRunner for o in gc.get_objects())


@pytest.fixture
def hf_built_alone(monkeypatch) -> list[int]:
    """Records how many runners of the benchmark are alive each time it builds HF."""
    alive: list[int] = []
    build = hf_baseline.build_hf_model
    before = _live_runners()  # other tests' module-scoped engines

    def checked(*args, **kwargs):
        alive.append(_live_runners() - before)
        return build(*args, **kwargs)

    monkeypatch.setattr(one_batch, "build_hf_model", checked)
    monkeypatch.setattr(offline_throughput, "build_hf_model", checked)
    return alive


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    return str(make_tiny_moe_checkpoint("qwen3-moe", tmp_path_factory.mktemp("qwen3-moe"),
                                        with_tokenizer=False))


def test_one_batch_compare_hf_end_to_end(tiny_moe: str, hf_built_alone: list[int],
                                         tmp_path) -> None:
    out = tmp_path / "rows.jsonl"
    one_batch.main(["--model-path", tiny_moe, "--dtype", "float32", "--batch-size", "1", "3",
                    "--input-len", "5", "--output-len", "6", "--compare-hf",
                    "--hf-batch-size", "3", "--hf-output-len", "4", "--result-file", str(out)])
    assert hf_built_alone == [0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert "hf_tok_s" not in rows[0]
    assert rows[1]["hf_output_len"] == 4 and rows[1]["hf_tok_s"] > 0
    assert rows[1]["speedup_vs_hf"] == pytest.approx(rows[1]["ours_e2e_tok_s"] / rows[1]["hf_tok_s"])


def test_offline_compare_hf_end_to_end(tiny_moe: str, hf_built_alone: list[int],
                                       tmp_path) -> None:
    out = tmp_path / "row.jsonl"
    offline_throughput.main(["--model-path", tiny_moe, "--dtype", "float32",
                             "--num-prompts", "4", "--input-range", "5", "9",
                             "--output-range", "2", "5", "--compare-hf", "--hf-num-prompts",
                             "2", "--result-file", str(out)])
    assert hf_built_alone == [0]
    row = json.loads(out.read_text())
    assert row["hf_requests"] == 2 and row["output_tokens"] > 0 and row["speedup_vs_hf"] > 0


def test_one_batch_prefills_in_batches_of_max_prefill_tokens(tiny_moe: str,
                                                             monkeypatch) -> None:
    """Five requests of 7 tokens under a 16-token budget: forwards of 2, 2 and 1."""
    from radixserve.server_args import ServerArgs

    sa = ServerArgs(model_path=tiny_moe, dtype="float32", max_prefill_tokens=16,
                    max_total_tokens=256, max_running_requests=5, skip_tokenizer_init=True)
    runner = ModelRunner(sa.runner_config(), ModelConfig.from_load_config(sa.load_config()))
    sizes = []
    forward = runner.forward_batch_generation
    monkeypatch.setattr(runner, "forward_batch_generation",
                        lambda batch: sizes.append(len(batch.reqs)) or forward(batch))
    r = one_batch.run_one(runner, 5, 7, 3, max_prefill_tokens=sa.max_prefill_tokens)
    assert sizes == [2, 2, 1, 5, 5] and len(r["decode_steps_s"]) == 2
