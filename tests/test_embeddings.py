"""Pooling models against HF transformers on tiny random float32 checkpoints: decoder
embeddings (--is-embedding, last token, normalised), BERT / XLM-R encoders (CLS and mean
pooling), and classification / reward scores; each batched and one prompt at a time,
through the offline Engine (the same Scheduler as the server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from radixserve.engine import Engine

VOCAB = 512
TOL = 1e-5
# Token ids from 3 up: 0 is the classifiers' pad token and 1 XLM-R's padding index,
# which transformers treats specially.
PROMPTS = [[5, 17, 300, 42, 8, 99, 7], [3], [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [64, 65]]

_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=80)


def _randomize_norms(model: torch.nn.Module) -> None:
    """Random norms and biases too, so a loader that skipped them would be caught."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)


def _save(model: torch.nn.Module, path: Path) -> Path:
    _randomize_norms(model)
    model.eval().save_pretrained(path)
    return path


def _engine(path: Path, **kwargs) -> Engine:
    return Engine(model_path=str(path), skip_tokenizer_init=True, max_total_tokens=2048,
                  disable_progress_bar=True, **kwargs)


def _vectors(results: list[dict]) -> list[torch.Tensor]:
    return [torch.tensor(r["embedding"], dtype=torch.float32) for r in results]


def _assert_close(ours: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    assert len(ours) == len(refs)
    for a, b in zip(ours, refs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


def _assert_idle(engine: Engine) -> None:
    info = engine.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


def _check_engine(engine: Engine, refs: list[torch.Tensor]) -> None:
    """Batched, then one prompt per call, then the batch again (prefixes now cached)."""
    _assert_close(_vectors(engine.encode(input_ids=PROMPTS)), refs)
    _assert_close([_vectors([engine.encode(input_ids=p)])[0] for p in PROMPTS], refs)
    _assert_close(_vectors(engine.encode(input_ids=PROMPTS)), refs)
    _assert_idle(engine)


# --- decoders served with --is-embedding --------------------------------------------

def _decoder_refs(path: Path) -> list[torch.Tensor]:
    base = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [F.normalize(base(torch.tensor([p])).last_hidden_state[0, -1], dim=-1)
                for p in PROMPTS]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_decoder_embeddings_match_hf(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    config = (tf.Qwen3Config(head_dim=32, **_DECODER) if family == "qwen3"
              else tf.LlamaConfig(**_DECODER))
    path = _save(tf.AutoModelForCausalLM.from_config(config), tmp_path / family)
    refs = _decoder_refs(path)
    engine = _engine(path, is_embedding=True)
    try:
        _check_engine(engine, refs)
        # The prefix cache served part of the repeated prompts: still the same vectors.
        again = engine.encode(input_ids=PROMPTS[0])
        assert again["meta_info"]["cached_tokens"] > 0
        _assert_close(_vectors([again]), refs[:1])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kwargs", [
    {"chunked_prefill_size": 4, "disable_radix_cache": True},  # several chunks a prompt
    {"chunked_prefill_size": 4, "page_size": 4},
    {"enable_cpu_overlap": True},  # the overlapped loop, CUDA's default
], ids=["chunked", "chunked-paged", "overlap"])
def test_decoder_embeddings_in_other_scheduler_modes_match_hf(tmp_path: Path,
                                                              kwargs: dict) -> None:
    torch.manual_seed(1)
    path = _save(tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(head_dim=32, **_DECODER)),
                 tmp_path / "q3")
    refs = _decoder_refs(path)
    engine = _engine(path, is_embedding=True, **kwargs)
    try:
        _check_engine(engine, refs)
    finally:
        engine.shutdown()


def test_bare_decoder_stack_is_an_embedder(tmp_path: Path) -> None:
    """A `Qwen3Model` checkpoint (no head, tensors without `model.`), as embedding
    models are often saved: served as an embedder without --is-embedding."""
    torch.manual_seed(2)
    path = _save(tf.Qwen3Model(tf.Qwen3Config(head_dim=32, **_DECODER)), tmp_path / "bare")
    refs = _decoder_refs(path)
    engine = _engine(path)
    try:
        _check_engine(engine, refs)
    finally:
        engine.shutdown()


def test_matryoshka_dimensions_truncate_then_renormalize(tmp_path: Path) -> None:
    torch.manual_seed(3)
    path = _save(tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**_DECODER)),
                 tmp_path / "llama")
    base = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [F.normalize(base(torch.tensor([p])).last_hidden_state[0, -1, :16], dim=-1)
                for p in PROMPTS]
    engine = _engine(path, is_embedding=True)
    try:
        _assert_close(_vectors(engine.encode(input_ids=PROMPTS, dimensions=16)), refs)
        for bad in (0, 65, -1, True, "16"):
            with pytest.raises(ValueError, match="dimensions"):
                engine.encode(input_ids=PROMPTS[0], dimensions=bad)
        with pytest.raises(ValueError, match="embeddings or scores"):
            engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 2})
        with pytest.raises(ValueError, match="empty"):
            engine.encode(input_ids=[])
        with pytest.raises(ValueError, match="context length"):
            engine.encode(input_ids=[5] * 129)
        # A prompt may fill the whole context: nothing is generated after it.
        assert len(engine.encode(input_ids=[5] * 128)["embedding"]) == 64
        _assert_idle(engine)
    finally:
        engine.shutdown()


# --- encoders -----------------------------------------------------------------------

def _encoder(kind: str, path: Path, pooling: str | None) -> list[torch.Tensor]:
    """Save a tiny BERT / XLM-R (with a sentence-transformers pooling config when
    `pooling` is given); return HF's pooled, normalised outputs."""
    torch.manual_seed(4)
    model = (tf.BertModel(tf.BertConfig(**_ENCODER)) if kind == "bert"
             else tf.XLMRobertaModel(tf.XLMRobertaConfig(**_ENCODER, pad_token_id=1)))
    _save(model, path)
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean"}))
    refs = []
    with torch.no_grad():
        for p in PROMPTS:
            hidden = model(torch.tensor([p])).last_hidden_state[0]
            pooled = hidden.mean(0) if pooling == "mean" else hidden[0]
            refs.append(F.normalize(pooled, dim=-1))
    return refs


@pytest.mark.parametrize("kind,pooling", [("bert", None), ("bert", "mean"), ("bert", "cls"),
                                          ("xlm-roberta", "mean")])
def test_encoder_embeddings_match_hf(tmp_path: Path, kind: str, pooling: str | None) -> None:
    path = tmp_path / kind
    refs = _encoder(kind, path, pooling)
    engine = _engine(path)
    try:
        _check_engine(engine, refs)
        # Bidirectional: no prefix is reused (it would be computed without its suffix).
        assert engine.encode(input_ids=PROMPTS[0])["meta_info"]["cached_tokens"] == 0
    finally:
        engine.shutdown()


def test_encoder_prompt_longer_than_positions_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "xlmr"
    _encoder("xlm-roberta", path, None)
    engine = _engine(path)
    try:
        # 80 positions, the first two reserved by XLM-R's numbering: 78 tokens at most.
        assert len(engine.encode(input_ids=[5] * 78)["embedding"]) == 64
        with pytest.raises(ValueError, match="context length is 78"):
            engine.encode(input_ids=[5] * 79)
        _assert_idle(engine)
    finally:
        engine.shutdown()


# --- classification and reward heads ------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_sequence_classification_scores_match_hf(tmp_path: Path, family: str) -> None:
    torch.manual_seed(5)
    configs = {"qwen2": lambda: tf.Qwen2Config(num_labels=3, **_DECODER),
               "llama": lambda: tf.LlamaConfig(num_labels=3, **_DECODER),
               "qwen3": lambda: tf.Qwen3Config(num_labels=3, head_dim=32, **_DECODER)}
    hf = tf.AutoModelForSequenceClassification.from_config(configs[family]())
    path = _save(hf, tmp_path / family)
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in PROMPTS]
    engine = _engine(path)
    try:
        _check_engine(engine, refs)
        with pytest.raises(ValueError, match="dimensions"):
            engine.encode(input_ids=PROMPTS[0], dimensions=2)
    finally:
        engine.shutdown()


def test_reward_model_scores_match_hf(tmp_path: Path) -> None:
    """Qwen2ForRewardModel (Qwen2.5-Math-RM's layout; transformers has no class for it):
    the reference is HF's Qwen2Model with the checkpoint's head applied in torch."""
    torch.manual_seed(6)
    config = tf.Qwen2Config(**_DECODER)
    base = tf.Qwen2Model(config)
    _randomize_norms(base)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    path = tmp_path / "rm"
    path.mkdir()
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    tensors.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"))
    config.architectures = ["Qwen2ForRewardModel"]  # num_labels left at transformers' 2
    config.save_pretrained(path)
    with torch.no_grad():
        refs = [head(base.eval()(torch.tensor([p])).last_hidden_state[0, -1]) for p in PROMPTS]
    engine = _engine(path)
    try:
        _check_engine(engine, refs)
    finally:
        engine.shutdown()


def test_pooling_reaches_the_api_process_in_the_model_info() -> None:
    """The server's TokenizerManager learns the pooling from the scheduler's model info
    (a plain dict): it must come back whole."""
    from radixserve.configs.pooling_config import PoolingConfig
    from radixserve.managers.request_validation import ModelLimits

    limits = ModelLimits(64, 1000, 48, (2,), {}, PoolingConfig(
        "classify", "last", False, False, 3, ("a", "b", "c"), matryoshka_dimensions=(1, 2)))
    assert ModelLimits.from_model_info(limits.to_model_info()) == limits


def test_sentence_transformers_pooling_config_is_read(tmp_path: Path) -> None:
    from radixserve.configs.pooling_config import pooling_config_for

    config = tf.BertConfig(**_ENCODER)
    assert pooling_config_for(str(tmp_path), config, "BertModel", False).method == "cls"
    (tmp_path / "1_Pooling").mkdir()
    cfg = tmp_path / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert pooling_config_for(str(tmp_path), config, "BertModel", False).method == "mean"
    cfg.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        pooling_config_for(str(tmp_path), config, "BertModel", False)
    with pytest.raises(ValueError, match="--is-embedding does not support"):
        pooling_config_for(str(tmp_path), config, "DeepseekV3ForCausalLM", True)
    assert pooling_config_for(str(tmp_path), config, "LlamaForCausalLM", False) is None


def test_is_embedding_on_an_unsupported_architecture_is_a_flag_error(tmp_path: Path) -> None:
    """One argparse line and exit status 2, before any model loads."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}))
    done = subprocess.run([sys.executable, "-m", "radixserve.launch_server", "--model-path",
                           str(tmp_path), "--is-embedding"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "--is-embedding does not support DeepseekV3ForCausalLM" in last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kwargs", [{"tp_size": 2}, {"dp_size": 2}], ids=["tp2", "dp2"])
def test_decoder_embeddings_under_tp_and_dp_match_hf(tmp_path: Path, kwargs: dict) -> None:
    """Rank processes on gloo: the pooled vector of a TP group (whole on every rank) and
    the DP controller's merged outputs carry the embeddings too."""
    torch.manual_seed(7)
    path = _save(tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(head_dim=32, **_DECODER)),
                 tmp_path / "q3")
    refs = _decoder_refs(path)
    with _engine(path, is_embedding=True, log_level="warning", **kwargs) as engine:
        _assert_close(_vectors(engine.encode(input_ids=PROMPTS)), refs)
        _assert_close([_vectors([engine.encode(input_ids=p)])[0] for p in PROMPTS[:2]],
                      refs[:2])
