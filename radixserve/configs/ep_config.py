"""EpConfig: the part of ServerArgs that expert parallelism, DP-attention and EPLB read.

Built by `ServerArgs.ep_config()`; carried to the ModelRunner inside RunnerConfig, which
installs it (layers/moe/ep/state.py) before the model is built, so that the MoE layers
know how their experts are placed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SGLang's recorder modes. stat and stat_approx both count (layer, logical expert)
# choices over every pass (there is no approximate counter here: both are exact);
# per_pass keeps one count per forward pass; per_token keeps every token's top-k ids.
RECORDER_MODES = ("stat", "stat_approx", "per_pass", "per_token")
EPLB_ALGORITHMS = ("auto", "deepseek", "deepseek_hierarchical")


@dataclass(frozen=True)
class EpConfig:
    ep_size: int = 1
    enable_dp_attention: bool = False
    ep_num_redundant_experts: int = 0
    enable_eplb: bool = False
    eplb_algorithm: str = "auto"
    eplb_rebalance_num_iterations: int = 1000
    expert_distribution_recorder_mode: str | None = None
    nnodes: int = 1

    @property
    def uses_expert_layers(self) -> bool:
        """Whether the MoE layers take the expert-parallel path (EpFusedMoE): sharded
        experts, or a placement/recording feature that needs the slot map."""
        return (self.ep_size > 1 or self.enable_dp_attention or self.enable_eplb
                or self.ep_num_redundant_experts > 0
                or self.expert_distribution_recorder_mode is not None)


# Architectures whose MoE layers take the expert-parallel path (they build their
# routed experts with make_fused_moe).
EP_ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
                    "DeepseekV3ForCausalLM")


def verify_ep_args(cfg: EpConfig, tp_size: int, dp_size: int, model_path: str,
                   speculative: bool) -> None:
    """ValueError naming the flag for a combination that cannot run (ServerArgs turns it
    into a one-line argparse error, before anything loads)."""
    if cfg.ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {cfg.ep_size}")
    if tp_size % cfg.ep_size:
        raise ValueError(f"ep_size={cfg.ep_size} must divide tp_size={tp_size}")
    if cfg.ep_size not in (1, tp_size):
        raise ValueError(f"ep_size={cfg.ep_size} with tp_size={tp_size}: only ep_size 1 or "
                         f"ep_size == tp_size (each rank holds whole experts) is supported")
    if cfg.ep_num_redundant_experts < 0:
        raise ValueError("ep_num_redundant_experts must be >= 0")
    if cfg.eplb_rebalance_num_iterations < 1:
        raise ValueError("eplb_rebalance_num_iterations must be >= 1")
    if cfg.eplb_algorithm not in EPLB_ALGORITHMS:
        raise ValueError(f"eplb_algorithm must be one of {', '.join(EPLB_ALGORITHMS)}, got "
                         f"{cfg.eplb_algorithm!r}")
    mode = cfg.expert_distribution_recorder_mode
    if mode is not None and mode not in RECORDER_MODES:
        raise ValueError(f"expert_distribution_recorder_mode must be one of "
                         f"{', '.join(RECORDER_MODES)}, got {mode!r}")
    if cfg.enable_dp_attention:
        if not (tp_size == dp_size == cfg.ep_size) or tp_size < 2:
            raise ValueError(f"enable_dp_attention needs tp_size == dp_size == ep_size >= 2 "
                             f"(attention data-parallel over the ranks, experts expert-"
                             f"parallel), got tp_size={tp_size} dp_size={dp_size} "
                             f"ep_size={cfg.ep_size}")
        if speculative:
            raise ValueError("enable_dp_attention does not support speculative decoding")
    elif dp_size > 1 and cfg.uses_expert_layers:
        raise ValueError("ep_size / EPLB / the expert recorder with dp_size > 1 need "
                         "--enable-dp-attention (independent replicas do not share experts)")
    if cfg.uses_expert_layers and cfg.ep_size != tp_size:
        raise ValueError(f"ep_num_redundant_experts, enable_eplb and "
                         f"expert_distribution_recorder_mode need ep_size == tp_size, got "
                         f"ep_size={cfg.ep_size} tp_size={tp_size}")
    _verify_against_model(cfg, model_path)


def _verify_against_model(cfg: EpConfig, model_path: str) -> None:
    """The checks that need the model's config.json (skipped when there is none here:
    a GGUF file or a hub id resolved later; loading then raises the same errors)."""
    path = Path(model_path) / "config.json"
    if not cfg.uses_expert_layers or not path.is_file():
        return
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    experts = routed_experts(config)
    if not experts or not set(archs) & set(EP_ARCHITECTURES):
        what = ("enable_dp_attention" if cfg.enable_dp_attention else
                "ep_size / EPLB / the expert recorder")
        raise ValueError(f"{what} is for mixture-of-experts models "
                         f"({', '.join(EP_ARCHITECTURES)}); {model_path} is {archs}")
    physical = experts + cfg.ep_num_redundant_experts
    if physical % cfg.ep_size:
        raise ValueError(f"ep_size={cfg.ep_size} must divide the model's {experts} routed "
                         f"experts + ep_num_redundant_experts={cfg.ep_num_redundant_experts}")


def routed_experts(config: Any) -> int:
    """Routed experts per MoE layer of an HF config (a PretrainedConfig or its dict);
    0 for a dense model. transformers 5 saves Qwen3-MoE's as num_local_experts."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return int(get("num_experts") or get("num_local_experts") or get("n_routed_experts") or 0)
