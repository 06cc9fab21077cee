"""The expert-load recorder (--expert-distribution-recorder-mode): what routing chose,
per MoE layer and logical expert.

Each MoE layer hands its top-k logical ids to `record` on every pass (device ops only:
an index_add into a [layers, experts] counter, so it is graph-capturable). A rank
records only the tokens it dispatches (its share under TP, its own requests under
DP-attention), so `dump` sums over the EP group and every token counts once. Modes:

* stat / stat_approx: the running count per (layer, logical expert) (both exact);
* per_pass: also one count per forward pass;
* per_token: also every pass's top-k ids per layer (for offline analysis).

Recording runs between `start` and `stop`; `dump` with a group sums over it, a
collective (every rank calls it at the same point), and with a path writes the result
there with torch.save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from radixserve.distributed.ep_group import EpGroup


class ExpertDistributionRecorder:
    def __init__(self, mode: str, num_layers: int, num_logical: int,
                 device: torch.device | str = "cpu") -> None:
        self.mode = mode
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.recording = False
        # The running count since `start`, in every mode.
        self.counts = torch.zeros(num_layers, num_logical, dtype=torch.int64, device=device)
        self._ones = torch.ones(0, dtype=torch.int64, device=device)
        self._at_pass_start = self.counts.clone()  # per_pass: the count before this pass
        self.passes: list[Any] = []  # per_pass: [layers, experts]; per_token: {layer: ids}
        self._pass: dict[int, torch.Tensor] = {}

    def start(self) -> None:
        self.reset()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def reset(self) -> None:
        self.counts.zero_()
        self._at_pass_start.zero_()
        self.passes.clear()
        self._pass = {}

    def record(self, layer: int, logical_ids: torch.Tensor) -> None:
        if not self.recording:
            return
        flat = logical_ids.flatten().long()
        if self._ones.numel() < flat.numel():
            self._ones = torch.ones(max(flat.numel(), 2 * self._ones.numel()),
                                    dtype=torch.int64, device=flat.device)
        self.counts[layer].index_add_(0, flat, self._ones[:flat.numel()])
        if self.mode == "per_token":
            self._pass[layer] = logical_ids.detach().to("cpu", torch.int64)

    def end_pass(self) -> None:
        """A forward pass is over: per_pass and per_token keep what it recorded."""
        if not self.recording:
            return
        if self.mode == "per_pass":
            self.passes.append((self.counts - self._at_pass_start).cpu())
            self._at_pass_start.copy_(self.counts)
        elif self.mode == "per_token":
            self.passes.append(self._pass)
            self._pass = {}

    def dump(self, group: EpGroup | None, path: str | Path | None = None) -> dict[str, Any]:
        """The record; with `group`, summed over its ranks (collective: every rank calls
        it at the same point), else this rank's alone. per_token keeps each rank's own
        tokens (in rank order, under `ranks`)."""
        group = group or EpGroup()
        out: dict[str, Any] = {"mode": self.mode,
                               "logical_count": group.all_reduce_sum(self.counts.clone()).cpu()}
        if self.mode == "per_pass":
            stacked = (torch.stack(self.passes) if self.passes
                       else torch.zeros(0, self.num_layers, self.num_logical,
                                        dtype=torch.int64))
            # Ranks run the same passes (they step together), so pass i lines up.
            out["logical_count_per_pass"] = group.all_reduce_sum(
                stacked.to(self.counts.device)).cpu()
        elif self.mode == "per_token":
            out["ranks"] = group.gather_objects(self.passes)
        if path is not None:
            torch.save(out, path)
        return out
