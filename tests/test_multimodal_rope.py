"""M-RoPE: our MRotaryEmbedding against HF's Qwen2.5-VL (sectioned) and Qwen3-VL
(interleaved) rotary embeddings, its per-batch table through the Triton rotary kernel
(the CUDA path; here in Triton's interpreter), and the (t, h, w) prompt positions
against HF's get_rope_index for text, images and videos."""

from __future__ import annotations

import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.layers.rotary_embedding import (MRotaryEmbedding, RotaryEmbedding,  # noqa: E402
                                                get_rope, rope_params)
from radixserve.multimodal.inputs import MultimodalItem  # noqa: E402
from radixserve.multimodal.mrope import qwen2_5_vl_rope_index  # noqa: E402

HEAD_DIM = 32
HEADS, KV_HEADS = 3, 2


def _hf_rotary(interleaved: bool, section: list[int]):
    if interleaved:
        from transformers import Qwen3VLTextConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            Qwen3VLTextRotaryEmbedding as Rotary, apply_rotary_pos_emb)

        config = Qwen3VLTextConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                   head_dim=HEAD_DIM, rope_parameters={
                                       "rope_type": "default", "rope_theta": 5000.0,
                                       "mrope_section": section, "mrope_interleaved": True})
    else:
        from transformers import Qwen2_5_VLTextConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VLRotaryEmbedding as Rotary, apply_rotary_pos_emb)

        config = Qwen2_5_VLTextConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                      rope_parameters={"rope_type": "default",
                                                       "rope_theta": 5000.0,
                                                       "mrope_section": section})
    return config, Rotary(config), apply_rotary_pos_emb


@pytest.mark.parametrize("interleaved,section", [(False, [4, 6, 6]), (True, [6, 5, 5])])
def test_mrope_matches_hf(interleaved: bool, section: list[int]) -> None:
    config, hf_rotary, hf_apply = _hf_rotary(interleaved, section)
    theta, scaling = rope_params(config)
    assert scaling == {"rope_type": "mrope", "mrope_section": section,
                       "mrope_interleaved": interleaved}
    ours = get_rope(HEAD_DIM, HEAD_DIM, 512, theta, scaling)
    assert isinstance(ours, MRotaryEmbedding)
    torch.manual_seed(0)
    t = 37
    positions = torch.stack([torch.randint(0, 200, (t,)), torch.randint(0, 300, (t,)),
                             torch.randint(0, 400, (t,))])
    q = torch.randn(t, HEADS * HEAD_DIM)
    k = torch.randn(t, KV_HEADS * HEAD_DIM)
    cos, sin = hf_rotary(q, positions.view(3, 1, t))
    want_q, want_k = hf_apply(q.view(1, t, HEADS, HEAD_DIM).transpose(1, 2),
                              k.view(1, t, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
    got_q, got_k = ours.forward_native(positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q.view(t, HEADS, HEAD_DIM), want_q[0].transpose(0, 1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.view(t, KV_HEADS, HEAD_DIM), want_k[0].transpose(0, 1),
                               atol=1e-5, rtol=1e-5)


def test_mrope_with_equal_axes_is_plain_rope() -> None:
    """1-D positions (decode, text-only batches) and [3, T] positions with equal rows."""
    mrope = MRotaryEmbedding(HEAD_DIM, HEAD_DIM, 256, 10000.0, True, [4, 6, 6])
    plain = RotaryEmbedding(HEAD_DIM, HEAD_DIM, 256, 10000.0, True)
    pos = torch.randint(0, 256, (11,))
    q, k = torch.randn(11, HEADS * HEAD_DIM), torch.randn(11, KV_HEADS * HEAD_DIM)
    want = plain.forward_native(pos, q.clone(), k.clone())
    for positions in (pos, pos.view(1, -1).expand(3, -1)):
        got = mrope.forward_native(positions, q.clone(), k.clone())
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_table_through_the_triton_rotary_kernel(interleaved: bool) -> None:
    """The CUDA path: the per-batch table with positions 0..T-1 in the rotary kernel."""
    from radixserve.layers.triton_kernels import apply_rotary_

    section = [6, 5, 5] if interleaved else [4, 6, 6]
    mrope = MRotaryEmbedding(HEAD_DIM, HEAD_DIM, 256, 10000.0, True, section, interleaved)
    t = 13
    positions = torch.randint(0, 256, (3, t))
    q, k = torch.randn(t, HEADS * HEAD_DIM), torch.randn(t, KV_HEADS * HEAD_DIM)
    want_q, want_k = mrope.forward_native(positions, q.clone(), k.clone())
    table, rows = mrope._table_and_rows(positions)
    got_q, got_k = q.clone(), k.clone()
    apply_rotary_(got_q, got_k, rows, table, True, HEAD_DIM)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)


def _hf_rope_index(ids: list[int], image_grids, video_grids, seconds, merge, tps):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(vision_config={"spatial_merge_size": merge,
                                             "tokens_per_second": tps})
    this = types.SimpleNamespace(
        config=config,
        get_vision_position_ids=lambda *a, **kw: Qwen2_5_VLModel.get_vision_position_ids(
            None, *a, **kw))
    x = torch.tensor([ids])
    types_ = (x == 1).int() + 2 * (x == 2).int()
    return Qwen2_5_VLModel.get_rope_index(
        this, x, types_, image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None)


def test_rope_index_matches_hf() -> None:
    """Text, an image, more text, a video at a frame rate that rounds, text; and an
    image at the very start."""
    merge, tps = 2, 2
    # ids: 0 = text, 1 = image pad, 2 = video pad.
    layout = [("text", 5), ("image", (1, 6, 4)), ("text", 3), ("video", (3, 4, 8)),
              ("text", 2), ("image", (1, 2, 10)), ("text", 1)]
    ids, items, grids, vgrids = [], [], [], []
    seconds = [0.7]
    for kind, spec in layout:
        if kind == "text":
            ids += [0] * spec
            continue
        n = spec[0] * spec[1] * spec[2] // merge ** 2
        items.append(MultimodalItem(kind, 0, torch.empty(0, 1), spec, len(ids), n,
                                    second_per_grid_t=seconds[0]))
        (grids if kind == "image" else vgrids).append(list(spec))
        ids += [1 if kind == "image" else 2] * n
    want_pos, want_delta = _hf_rope_index(ids, grids, vgrids, seconds, merge, tps)
    got_pos, got_delta = qwen2_5_vl_rope_index(len(ids), items, merge, tps)
    assert torch.equal(got_pos, want_pos[:, 0])
    assert got_delta == int(want_delta)
    # An image first, nothing after it.
    item = MultimodalItem("image", 0, torch.empty(0, 1), (1, 4, 6), 0, 6)
    want_pos, want_delta = _hf_rope_index([1] * 6, [[1, 4, 6]], None, None, merge, tps)
    got_pos, got_delta = qwen2_5_vl_rope_index(6, [item], merge, tps)
    assert torch.equal(got_pos, want_pos[:, 0]) and got_delta == int(want_delta)
