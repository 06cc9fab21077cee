"""PoolingConfig: how a model that answers with vectors instead of tokens pools them.

Three kinds of model run prefill only and return one vector per request:
  * a decoder served with --is-embedding (Qwen3-Embedding and the like): the last
    token's hidden state, L2-normalised;
  * an encoder (BertModel, XLMRobertaModel): CLS or mean pooling, as the checkpoint's
    sentence-transformers `1_Pooling/config.json` says (CLS when it has none),
    L2-normalised as SGLang does for every embedding model;
  * a classification or reward head (`*ForSequenceClassification`,
    `Qwen2ForRewardModel`): the head's scores on the last token, not normalised.

The config is plain data (it travels to the API process inside the model info), read
once at startup from the architecture name and the checkpoint folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # server_args reads the names below without loading transformers
    from transformers import PretrainedConfig

ENCODER_ARCHITECTURES = ("BertModel", "XLMRobertaModel")
# Decoder stacks saved without a head (transformers' AutoModel): embedders by nature.
BARE_DECODER_ARCHITECTURES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")
CAUSAL_EMBEDDING_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM")
CLASSIFIER_ARCHITECTURES = ("LlamaForSequenceClassification",
                            "MistralForSequenceClassification",
                            "Qwen2ForSequenceClassification",
                            "Qwen3ForSequenceClassification", "Qwen2ForRewardModel")

POOLING_METHODS = ("last", "cls", "mean")


@dataclass(frozen=True)
class PoolingConfig:
    task: str  # "embed": /v1/embeddings, /encode; "classify": /classify, /v1/classify
    method: str  # one of POOLING_METHODS
    normalize: bool
    # Every token attends to every other: no prefix reuse and no chunked prefill.
    bidirectional: bool
    output_dim: int  # the embedding's size, or the number of classes
    labels: tuple[str, ...] = ()  # classify: the class names, in score order
    # Sizes a Matryoshka model was trained to be cut to (config.json's
    # `matryoshka_dimensions`); None: any size up to output_dim.
    matryoshka_dimensions: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolingConfig":
        dims = d.get("matryoshka_dimensions")
        return cls(task=str(d["task"]), method=str(d["method"]),
                   normalize=bool(d["normalize"]), bidirectional=bool(d["bidirectional"]),
                   output_dim=int(d["output_dim"]), labels=tuple(d.get("labels") or ()),
                   matryoshka_dimensions=None if dims is None else tuple(int(x) for x in dims))


def pooling_config_for(model_path: str, hf_config: PretrainedConfig, architecture: str,
                       is_embedding: bool) -> PoolingConfig | None:
    """The model's pooling, or None for a generating model. Raises ValueError for an
    architecture that --is-embedding cannot serve."""
    hidden = int(hf_config.hidden_size)
    if architecture in CLASSIFIER_ARCHITECTURES:
        # A reward model scores with one value, whatever num_labels its config carries
        # (transformers' default is 2), as SGLang's Qwen2ForRewardModel does.
        labels = _labels(hf_config)
        if architecture == "Qwen2ForRewardModel":
            labels = labels[:1]
        return PoolingConfig("classify", "last", False, False, len(labels), labels)
    dims = _matryoshka_dimensions(hf_config, hidden)
    if architecture in ENCODER_ARCHITECTURES:
        return PoolingConfig("embed", _sentence_transformers_pooling(model_path), True, True,
                             hidden, matryoshka_dimensions=dims)
    if architecture in BARE_DECODER_ARCHITECTURES or (
            is_embedding and architecture in CAUSAL_EMBEDDING_ARCHITECTURES):
        return PoolingConfig("embed", "last", True, False, hidden, matryoshka_dimensions=dims)
    if is_embedding:
        raise ValueError(f"--is-embedding does not support {architecture}; it serves "
                         f"{', '.join(CAUSAL_EMBEDDING_ARCHITECTURES + ENCODER_ARCHITECTURES)}")
    return None


def _labels(hf_config: PretrainedConfig) -> tuple[str, ...]:
    id2label = getattr(hf_config, "id2label", None) or {}
    num = int(getattr(hf_config, "num_labels", None) or len(id2label) or 1)
    return tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num))


def _matryoshka_dimensions(hf_config: PretrainedConfig, hidden: int
                           ) -> tuple[int, ...] | None:
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if not dims:
        return None
    out = tuple(int(d) for d in dims)
    if any(not 0 < d <= hidden for d in out):
        raise ValueError(f"matryoshka_dimensions {list(out)} must lie in [1, {hidden}]")
    return out


def _sentence_transformers_pooling(model_path: str) -> str:
    """CLS or mean, from `1_Pooling/config.json`; CLS when the folder has none."""
    path = os.path.join(model_path, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "cls"
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    used = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v)
    raise ValueError(f"{path}: pooling {used} is not supported (cls, mean or last token)")
