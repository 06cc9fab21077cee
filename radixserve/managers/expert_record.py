"""The expert-load recorder's control path: start, stop and dump, for the Scheduler
and each of its fronts (TP, DP-attention, the DP controller).

The record itself lives in the model (layers/moe/ep/expert_distribution.py); this turns
its dump into a message of plain lists and sums the answers of several DP-attention
ranks.
"""

from __future__ import annotations

from typing import Any

from radixserve.managers.io_struct import ExpertDistributionReq, ExpertDistributionReqOutput

ACTIONS = ("start", "stop", "dump")


def handle_expert_record(experts: Any, req: ExpertDistributionReq) -> ExpertDistributionReqOutput:
    """Apply `req` to a model's ExpertParallelRuntime (None: no MoE expert layers)."""
    if req.action not in ACTIONS:
        return ExpertDistributionReqOutput(False, f"action must be one of {ACTIONS}")
    if experts is None or experts.state.recorder is None:
        return ExpertDistributionReqOutput(
            False, "the expert distribution recorder is off: start the server with "
                   "--expert-distribution-recorder-mode (on a mixture-of-experts model)")
    if req.action == "start":
        experts.start_record()
    elif req.action == "stop":
        experts.stop_record()
    else:
        dump = experts.dump_record(reduce=req.reduce)
        return ExpertDistributionReqOutput(True, "", _as_lists(dump))
    return ExpertDistributionReqOutput(True)


def merge_records(answers: list[ExpertDistributionReqOutput]) -> ExpertDistributionReqOutput:
    """One answer from each DP-attention rank's: counts summed; per_pass and per_token
    data kept per rank (ranks start and stop recording at slightly different passes)."""
    failed = [a for a in answers if not a.success]
    if failed:
        return failed[0]
    records = [a.record for a in answers if a.record is not None]
    if not records:
        return ExpertDistributionReqOutput(True)
    first = records[0]
    total = [[sum(col) for col in zip(*rows)]
             for rows in zip(*(r["logical_count"] for r in records))]
    merged = {"mode": first["mode"], "moe_layers": first["moe_layers"],
              "logical_count": total}
    for key in ("logical_count_per_pass", "per_token"):
        if key in first:
            merged[key] = [r[key] for r in records]
    return ExpertDistributionReqOutput(True, "", merged)


def _as_lists(dump: dict[str, Any]) -> dict[str, Any]:
    out = {"mode": dump["mode"], "moe_layers": dump["moe_layers"],
           "logical_count": dump["logical_count"].tolist()}
    if "logical_count_per_pass" in dump:
        out["logical_count_per_pass"] = dump["logical_count_per_pass"].tolist()
    if "ranks" in dump:
        out["per_token"] = [[{layer: ids.tolist() for layer, ids in p.items()} for p in rank]
                            for rank in dump["ranks"]]
    return out
