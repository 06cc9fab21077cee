"""EPLB's placement algorithm, the expert slot map, the expert-load recorder against
a hand count of the reference model's top-k choices, and the EP flags' validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from radixserve.layers.moe.ep.eplb_algorithm import gpu_loads, rebalance_experts
from radixserve.layers.moe.ep.expert_location import ExpertLocation
from tests.moe_factory import make_tiny_moe_checkpoint, one_thread  # noqa: F401


def _skewed_load(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """A Zipf-like load whose hot experts sit together (on the same GPU under the
    identity placement), shuffled differently per layer."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, experts + 1).double() ** 1.2
    return torch.stack([base[torch.randperm(experts, generator=g)] if layer else base
                        for layer in range(layers)])


@pytest.mark.parametrize("algorithm,groups,nodes", [
    ("deepseek", None, 1), ("deepseek_hierarchical", 8, 2), ("auto", 4, 2), ("auto", None, 1)])
@pytest.mark.parametrize("redundant", [0, 8])
def test_placement_covers_every_expert_and_balances(algorithm: str, groups: int | None,
                                                    nodes: int, redundant: int) -> None:
    layers, experts, gpus = 3, 32, 8
    load = _skewed_load(layers, experts)
    physical = experts + redundant
    p2l = rebalance_experts(load, physical, gpus, groups, nodes, algorithm)
    assert p2l.shape == (layers, physical)
    for row in p2l:
        assert set(row.tolist()) == set(range(experts))
    identity = torch.arange(physical).remainder(experts).expand(layers, -1)
    ours, trivial = gpu_loads(p2l, load, gpus), gpu_loads(identity, load, gpus)
    # Same total work, spread flatter: the busiest GPU carries less.
    torch.testing.assert_close(ours.sum(-1), trivial.sum(-1))
    assert bool((ours.max(-1).values < trivial.max(-1).values).all())
    if redundant:
        count = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(
            1, p2l, torch.ones_like(p2l))
        for layer in range(layers):
            by_load = load[layer].argsort(descending=True)
            # The extra slots went to the hottest experts, and never to a cold one.
            assert count[layer, by_load[0]] > 1
            assert bool((count[layer, by_load[experts // 2:]] == 1).all())
            if groups is None:  # one pool of experts: replicas follow the load exactly
                assert count[layer, by_load].diff().le(0).all()


def test_hierarchical_keeps_each_group_on_one_node() -> None:
    layers, experts, groups, nodes, gpus = 2, 32, 8, 2, 8
    load = _skewed_load(layers, experts, seed=3)
    p2l = rebalance_experts(load, experts + 8, gpus, groups, nodes, "deepseek_hierarchical")
    per_node = (experts + 8) // nodes
    for row in p2l:
        for node in range(nodes):
            on_node = set(row[node * per_node:(node + 1) * per_node].tolist())
            node_groups = {e // (experts // groups) for e in on_node}
            assert len(node_groups) == groups // nodes  # whole groups, half of them each


def test_hierarchical_needs_groups_dividing_nodes() -> None:
    with pytest.raises(ValueError, match="groups"):
        rebalance_experts(torch.ones(1, 12), 12, 4, 3, 2, "deepseek_hierarchical")


def test_slot_map_spreads_pairs_over_replicas() -> None:
    # Expert 0 has replicas in slots 0 and 4, expert 1 in 1 and 5.
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1]])
    loc = ExpertLocation(p2l, num_logical=4, ep_size=2)
    assert loc.slots_per_rank == 3
    phys = loc.to_physical(0, torch.tensor([[0, 1], [0, 1], [2, 3]]))
    assert phys.tolist() == [0, 1, 4, 5, 2, 3]
    assert bool((p2l[0][phys] == torch.tensor([0, 1, 0, 1, 2, 3])).all())
    with pytest.raises(ValueError, match="no slot"):
        ExpertLocation(torch.tensor([[0, 1, 2, 2]]), num_logical=4, ep_size=2)
    with pytest.raises(ValueError, match="split"):
        ExpertLocation(torch.tensor([[0, 1, 2, 3, 0]]), num_logical=4, ep_size=2)


# --- the recorder against a hand count ---------------------------------------------

def _hand_count(path: Path, prompts: list[list[int]], top_k: int) -> torch.Tensor:
    """[layers, experts]: how often HF's router picks each expert over the prompts'
    tokens (a prefill of each, as the engine runs with max_new_tokens=1)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = hf.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64)
    logits: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: logits.__setitem__(i, args[0] @ mod.weight.T))
        for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for ids in prompts:
            logits.clear()
            hf(torch.tensor([ids]))
            for layer, lg in logits.items():
                top = lg.reshape(-1, cfg.num_experts).float().softmax(-1).topk(top_k).indices
                counts[layer] += torch.bincount(top.flatten(), minlength=cfg.num_experts)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen2-moe"])
def test_recorder_counts_equal_the_routing_choices(arch: str, tmp_path: Path) -> None:
    from radixserve.engine import Engine

    path = make_tiny_moe_checkpoint(arch, tmp_path / arch, with_tokenizer=False)
    prompts = [[1, 5, 9, 200, 3000], [1, 7, 7, 7, 7, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
    dumps = {}
    for mode in ("stat", "per_pass", "per_token"):
        with Engine(str(path), skip_tokenizer_init=True, log_level="warning",
                    disable_radix_cache=True, expert_distribution_recorder_mode=mode) as engine:
            experts = engine.scheduler.model_runner.experts
            experts.start_record()
            for ids in prompts:  # one prefill pass each
                engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
            experts.stop_record()
            engine.generate(input_ids=prompts[0], sampling_params={"max_new_tokens": 1})
            dumps[mode] = experts.dump_record(tmp_path / f"{mode}.pt")
    top_k = engine.model_config.hf_config.num_experts_per_tok
    want = _hand_count(path, prompts, top_k)
    moe_layers = dumps["stat"]["moe_layers"]
    assert moe_layers == [i for i in range(want.shape[0]) if want[i].sum() > 0]
    assert torch.equal(dumps["stat"]["logical_count"], want)
    assert want.sum() == top_k * sum(map(len, prompts)) * len(moe_layers)
    per_pass = dumps["per_pass"]["logical_count_per_pass"]
    assert per_pass.shape[0] == len(prompts)  # one pass per prompt; none after stop
    assert torch.equal(per_pass.sum(0), want)
    token_passes = dumps["per_token"]["ranks"][0]
    assert len(token_passes) == len(prompts)
    for layer in moe_layers:
        ids = torch.cat([p[layer].flatten() for p in token_passes])
        assert torch.equal(torch.bincount(ids, minlength=want.shape[1]), want[layer])
    assert torch.equal(torch.load(tmp_path / "stat.pt")["logical_count"], want)


def test_recorder_off_is_an_error(tmp_path: Path) -> None:
    from radixserve.layers.moe.ep.ep_runtime import ExpertParallelRuntime
    from radixserve.layers.moe.ep.state import clear_expert_state, configure_experts
    from radixserve.configs.ep_config import EpConfig
    from radixserve.distributed.ep_group import EpGroup

    state = configure_experts(EpConfig(enable_eplb=True), EpGroup(), 2, 4,
                              torch.device("cpu"))
    clear_expert_state()
    with pytest.raises(ValueError, match="recorder-mode"):
        ExpertParallelRuntime(state, torch.nn.Module()).start_record()


# --- flags -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_and_dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.model_factory import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("flags")
    return (make_tiny_moe_checkpoint("deepseek-v2", root / "ds", with_tokenizer=False),
            make_tiny_checkpoint("llama", root / "llama", with_tokenizer=False))


@pytest.mark.parametrize("flags,message", [
    (["--tp-size", "2", "--ep-size", "3"], "ep_size=3 must divide tp_size=2"),
    (["--tp-size", "4", "--ep-size", "2"], "only ep_size 1 or ep_size == tp_size"),
    (["--tp-size", "2", "--ep-size", "2", "--ep-num-redundant-experts", "1"],
     "must divide the model's 8 routed experts"),
    (["--tp-size", "2", "--dp-size", "2", "--ep-size", "2", "--enable-dp-attention",
      "DENSE"], "is for mixture-of-experts models"),
    (["--tp-size", "2", "--ep-size", "2", "--enable-dp-attention"],
     "tp_size == dp_size == ep_size"),
    (["--tp-size", "2", "--enable-eplb"], "need ep_size == tp_size"),
    (["--expert-distribution-recorder-mode", "sometimes"], "invalid choice"),
    (["--eplb-algorithm", "random"], "invalid choice"),
])
def test_bad_ep_flags_are_argparse_errors(flags: list[str], message: str,
                                          moe_and_dense: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture) -> None:
    from radixserve.server_args import ServerArgs

    moe, dense = moe_and_dense
    model = str(dense) if "DENSE" in flags else str(moe)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    argv = ["--model-path", model, "--device", "cpu"] + [f for f in flags if f != "DENSE"]
    with pytest.raises(SystemExit) as exc:
        ServerArgs.from_cli_args(parser.parse_args(argv), parser)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_ep_flags_turn_cuda_graphs_off(moe_and_dense: tuple[Path, Path]) -> None:
    from radixserve.server_args import ServerArgs

    sa = ServerArgs(model_path=str(moe_and_dense[0]), device="cpu", tp_size=2, dp_size=2,
                    ep_size=2, enable_dp_attention=True, enable_eplb=True,
                    ep_num_redundant_experts=2)
    assert sa.disable_cuda_graph and sa.runner_config().ep.uses_expert_layers
    with pytest.raises(ValueError, match="speculative"):
        ServerArgs(model_path=str(moe_and_dense[0]), device="cpu", tp_size=2, dp_size=2,
                   ep_size=2, enable_dp_attention=True, speculative_algorithm="NGRAM")


def test_one_rank_expert_layers_with_eplb_change_no_output(tmp_path: Path) -> None:
    """ep_size 1 with redundant slots and a rebalance every 2 passes: the expert-parallel
    layer path on a single rank (the path the one-GPU test runs on CUDA)."""
    from radixserve.engine import Engine

    path = make_tiny_moe_checkpoint("deepseek-v3", tmp_path / "ds", with_tokenizer=False)
    prompts = [[1, 5, 9, 200, 3000], [1, 7, 7, 7]]
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    outs = {}
    for eplb in (False, True):
        kwargs = ({"ep_num_redundant_experts": 3, "enable_eplb": True,
                   "eplb_rebalance_num_iterations": 2} if eplb else {})
        with Engine(str(path), skip_tokenizer_init=True, log_level="warning", **kwargs) as e:
            outs[eplb] = e.generate(input_ids=prompts, sampling_params=params,
                                    return_logprob=True, top_logprobs_num=5)
            if eplb:
                experts = e.scheduler.model_runner.experts
                assert experts.rebalances >= 3
                assert experts.state.location.num_physical == 11
    for a, b in zip(outs[False], outs[True]):
        assert a["output_ids"] == b["output_ids"]
        for sa, sb in zip(a["meta_info"]["output_top_logprobs"],
                          b["meta_info"]["output_top_logprobs"]):
            assert [t for _, t in sa] == [t for _, t in sb]
            assert max(abs(x[0] - y[0]) for x, y in zip(sa, sb)) < 1e-4
