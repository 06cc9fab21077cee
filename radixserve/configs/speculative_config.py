"""SpeculativeConfig: the part of ServerArgs that the speculative workers read.

Built by `ServerArgs.speculative_config()` (None when speculation is off), with the
defaults already resolved: the workers never see a None count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from radixserve.configs.load_config import LoadConfig

ALGORITHMS = ("NGRAM", "EAGLE", "EAGLE3", "STANDALONE")
# The algorithms that run a second model as the drafter.
DRAFT_MODEL_ALGORITHMS = ("EAGLE", "EAGLE3", "STANDALONE")
NGRAM_MATCH_TYPES = ("BFS", "PROB")


@dataclass(frozen=True)
class SpeculativeConfig:
    algorithm: str
    num_steps: int
    eagle_topk: int
    # Tokens of one verify pass per request: the last accepted token plus the drafts.
    num_draft_tokens: int
    accept_threshold_single: float = 1.0
    accept_threshold_acc: float = 1.0
    draft_load: LoadConfig | None = None  # the draft model, for DRAFT_MODEL_ALGORITHMS
    ngram_min_match_window_size: int = 1
    ngram_max_match_window_size: int = 12
    ngram_min_bfs_breadth: int = 1
    ngram_max_bfs_breadth: int = 10
    ngram_match_type: str = "BFS"
    ngram_branch_length: int = 18
    ngram_capacity: int = 10_000_000

    @property
    def max_drafts(self) -> int:
        """Draft tokens proposed per request per step along one chain."""
        return self.num_draft_tokens - 1

# Defaults of the draft-model algorithms when the counts are not given (SGLang's for a
# chain: three steps, one token kept per step).
_DEFAULT_STEPS = 3
_DEFAULT_TOPK = 1
# Implemented workers; the other algorithms' flags parse, then fail in verify.
IMPLEMENTED = ("NGRAM", "STANDALONE")


def resolve_speculative(args: Any) -> None:
    """Fill the counts left None and turn off what the workers do not run with.

    `args` is a ServerArgs (it sits above this module). As in SGLang, the overlapped
    loop and mixed chunks are off under speculation: the next step's inputs depend on
    how many drafts the verify pass accepted.
    """
    if args.speculative_algorithm == "NGRAM":
        if args.speculative_num_draft_tokens is None:
            args.speculative_num_draft_tokens = args.speculative_ngram_max_match_window_size
        if args.speculative_num_steps is None:
            args.speculative_num_steps = args.speculative_num_draft_tokens - 1
        if args.speculative_eagle_topk is None:
            args.speculative_eagle_topk = 1
    else:
        if args.speculative_num_steps is None:
            args.speculative_num_steps = _DEFAULT_STEPS
        if args.speculative_eagle_topk is None:
            args.speculative_eagle_topk = _DEFAULT_TOPK
        if args.speculative_num_draft_tokens is None and args.speculative_eagle_topk == 1:
            args.speculative_num_draft_tokens = args.speculative_num_steps + 1
    args.disable_overlap_schedule = True
    args.enable_mixed_chunk = False


def verify_speculative(args: Any, target: LoadConfig) -> None:
    """One-line ValueErrors for settings no worker can run, before any model loads."""
    algo = args.speculative_algorithm
    if algo not in ALGORITHMS:
        raise ValueError(f"speculative_algorithm must be one of {', '.join(ALGORITHMS)}, "
                         f"got {algo!r}")
    if algo in DRAFT_MODEL_ALGORITHMS and not args.speculative_draft_model_path:
        raise ValueError(f"--speculative-algorithm {algo} needs "
                         f"--speculative-draft-model-path")
    if args.speculative_ngram_match_type not in NGRAM_MATCH_TYPES:
        raise ValueError(f"speculative_ngram_match_type must be one of "
                         f"{', '.join(NGRAM_MATCH_TYPES)}, got "
                         f"{args.speculative_ngram_match_type!r}")
    draft = args.speculative_num_draft_tokens
    if draft is not None and draft < 2:
        raise ValueError(f"speculative_num_draft_tokens must be >= 2 (the last accepted "
                         f"token and at least one draft), got {draft}")
    for name in ("speculative_num_steps", "speculative_eagle_topk",
                 "speculative_num_draft_tokens"):
        value = getattr(args, name)
        if value is None or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    steps, topk, draft = (args.speculative_num_steps, args.speculative_eagle_topk,
                          args.speculative_num_draft_tokens)
    if topk == 1 and algo != "NGRAM" and draft != steps + 1:
        raise ValueError(f"speculative_num_draft_tokens={draft} must be "
                         f"speculative_num_steps + 1 = {steps + 1} with "
                         f"speculative_eagle_topk 1 (a chain)")
    if draft > 1 + steps * topk:
        raise ValueError(f"speculative_num_draft_tokens={draft} exceeds what "
                         f"{steps} steps of top-{topk} can propose ({1 + steps * topk})")
    if args.speculative_ngram_min_match_window_size > args.speculative_ngram_max_match_window_size:
        raise ValueError("speculative_ngram_min_match_window_size must not exceed "
                         "speculative_ngram_max_match_window_size")
    if algo not in IMPLEMENTED:
        raise ValueError(f"--speculative-algorithm {algo} is not implemented yet "
                         f"(implemented: {', '.join(IMPLEMENTED)})")
    if topk != 1:
        raise ValueError(f"speculative_eagle_topk={topk}: only chain drafting (top-k 1) "
                         f"is implemented")
    if args.dp_size > 1 or args.tp_size > 1:
        raise ValueError("speculative decoding runs with tp_size 1 and dp_size 1 only")
    if algo in DRAFT_MODEL_ALGORITHMS:
        check_draft_vocab(target, draft_load_config(args, target))


def draft_load_config(args: Any, target: LoadConfig) -> LoadConfig:
    path = str(args.speculative_draft_model_path)
    fmt = "dummy" if target.load_format == "dummy" else "auto"
    return dataclasses.replace(target, model_path=path, tokenizer_path=None, load_format=fmt,
                               is_gguf=fmt == "auto" and path.endswith(".gguf"))


def check_draft_vocab(target: LoadConfig, draft: LoadConfig) -> None:
    """The draft proposes token ids of the target's vocabulary: a draft with another
    vocabulary is refused before either model loads (only their configs are read)."""
    from radixserve.configs.model_config import ModelConfig

    t = ModelConfig.from_load_config(target).vocab_size
    try:
        d = ModelConfig.from_load_config(draft).vocab_size
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the draft model's config at {draft.model_path}: "
                         f"{e}") from None
    if t != d:
        raise ValueError(f"the draft model's vocabulary ({d} tokens, {draft.model_path}) "
                         f"is not the target's ({t} tokens)")


def speculative_view(args: Any, target: LoadConfig) -> SpeculativeConfig:
    draft = (draft_load_config(args, target)
             if args.speculative_algorithm in DRAFT_MODEL_ALGORITHMS else None)
    return SpeculativeConfig(
        algorithm=args.speculative_algorithm, num_steps=args.speculative_num_steps,
        eagle_topk=args.speculative_eagle_topk,
        num_draft_tokens=args.speculative_num_draft_tokens,
        accept_threshold_single=args.speculative_accept_threshold_single,
        accept_threshold_acc=args.speculative_accept_threshold_acc, draft_load=draft,
        ngram_min_match_window_size=args.speculative_ngram_min_match_window_size,
        ngram_max_match_window_size=args.speculative_ngram_max_match_window_size,
        ngram_min_bfs_breadth=args.speculative_ngram_min_bfs_breadth,
        ngram_max_bfs_breadth=args.speculative_ngram_max_bfs_breadth,
        ngram_match_type=args.speculative_ngram_match_type,
        ngram_branch_length=args.speculative_ngram_branch_length,
        ngram_capacity=args.speculative_ngram_capacity)
