"""Checkpoint names of vision-language models, in either layout transformers saves."""

from __future__ import annotations

# transformers 5.x nests both towers under `model.`; older saves put the vision tower at
# the top and the language model under `model.`.
_NEW_LAYOUT = (("model.visual.", "visual."), ("model.language_model.", "model."))


def normalize_vl_name(name: str) -> str:
    """`visual.*` for the vision tower, `model.*` for the language model, `lm_head.*`."""
    for new, ours in _NEW_LAYOUT:
        if name.startswith(new):
            return ours + name[len(new):]
    return name
