"""MoE models end to end (Engine, CPU) against HF transformers: Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2 and DeepSeek-V3 (MLA) tiny random checkpoints, float32."""

from __future__ import annotations

import pytest
import torch

from radixserve.engine import Engine
from tests.model_factory import smollm2_tokenizer
from tests.moe_factory import MOE_ARCHS, make_tiny_moe_checkpoint, one_thread  # noqa: F401
from tests.test_engine import NEW_TOKENS, PROMPTS, hf_greedy


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_and_logprobs_match_hf(arch: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = make_tiny_moe_checkpoint(arch, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(model_path=str(path), max_total_tokens=8192)
    try:
        outs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                         "ignore_eos": True}, return_logprob=True,
                               top_logprobs_num=5)
    finally:
        engine.shutdown()
    tok = smollm2_tokenizer()
    for prompt, out in zip(PROMPTS, outs):
        ref_ids, ref_logits = hf_greedy(hf, tok.encode(prompt), NEW_TOKENS)
        assert out["output_ids"] == ref_ids, f"{arch}: greedy tokens differ for {prompt!r}"
        for step, (top, ref) in enumerate(zip(out["meta_info"]["output_top_logprobs"],
                                              ref_logits)):
            ref_lp = torch.log_softmax(ref, -1)
            ours = torch.tensor([lp for lp, _ in top])
            torch.testing.assert_close(ours, ref_lp[[tid for _, tid in top]], rtol=1e-4,
                                       atol=1e-4, msg=f"{arch} step {step}")
