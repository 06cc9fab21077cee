"""logit_bias on the GPU: the sampler's CUDA path, with and without CUDA graphs."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.model_factory import make_tiny_checkpoint

    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"),
                                    with_tokenizer=False))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (1, 9, 40)]


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_logit_bias_forces_bans_and_leaves_other_rows_alone(checkpoint: str,
                                                            cuda_graph: bool) -> None:
    from radixserve.engine import Engine

    engine = Engine(model_path=checkpoint, skip_tokenizer_init=True, max_total_tokens=8192,
                    mem_fraction_static=0.3, disable_cuda_graph=not cuda_graph)
    try:
        prompts = _prompts()
        base = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        plain = [r["output_ids"] for r in engine.generate(input_ids=prompts,
                                                          sampling_params=base)]
        # Row 0 forced to one token, row 1 banned from its greedy first token, row 2 plain.
        params = [{**base, "logit_bias": {"777": 100}},
                  {**base, "logit_bias": {str(plain[1][0]): -100}}, base]
        out = [r["output_ids"] for r in engine.generate(input_ids=prompts,
                                                        sampling_params=params)]
        assert out[0] == [777] * NEW_TOKENS
        assert plain[1][0] not in out[1]
        assert out[2] == plain[2]
        sampled = engine.generate(input_ids=prompts[0], sampling_params={
            **base, "temperature": 1.0, "logit_bias": {"5": 100}})
        assert sampled["output_ids"] == [5] * NEW_TOKENS
    finally:
        engine.shutdown()


def test_sampled_distribution_with_bias_on_cuda() -> None:
    from radixserve.core.sampling_params import SamplingParams
    from radixserve.layers.sampler import Sampler
    from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

    class _Req:  # the fields SamplingBatchInfo reads
        def __init__(self, p: SamplingParams) -> None:
            self.sampling_params, self.output_ids, self.grammar = p, [], None
            self.origin_input_ids, self.eos_token_ids = [1], ()

    torch.manual_seed(0)
    vocab, n = 6, 50_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]], device="cuda")
    params = SamplingParams(temperature=0.7, logit_bias={"1": 2.5, "5": -100, "3": 1.0})
    params.verify()
    params.normalize()
    info = SamplingBatchInfo.from_reqs([_Req(params)] * n, vocab, "cuda")
    draws = Sampler()(logits.repeat(n, 1), info)
    counts = torch.bincount(draws, minlength=vocab).double().cpu()
    biased = logits[0].cpu() + torch.tensor([0, 2.5, 0, 1.0, 0, -100])
    expected = torch.softmax(biased.double() / 0.7, dim=-1) * n
    assert counts[5] == 0
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 18.47, (counts, expected)
