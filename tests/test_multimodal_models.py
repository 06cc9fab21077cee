"""Qwen2.5-VL against HF transformers on a tiny random checkpoint (CPU, float32): greedy
tokens identical and prompt logprobs within 1e-4, for images of several sizes and
aspect ratios (one very small, one large), two images in one message, a video,
chunked prefill with a boundary inside an image's tokens, and the radix cache keyed by
image content."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vl_factory import make_image, make_qwen2_5_vl, token_ids, vl_tokenizer

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def hf_model(ckpt: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def image_processor(ckpt: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(ckpt)


def _engine(ckpt: Path, **kwargs):
    import radixserve as rs

    return rs.Engine(model_path=str(ckpt), dtype="float32", max_total_tokens=8192,
                     **kwargs)


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    with _engine(ckpt) as e:
        yield e


def _expand(ids: list[int], grids: list[list[int]], pad: int) -> list[int]:
    """The prompt as HF's processor expands it: each pad token -> t*h*w/4 copies."""
    out, it = [], iter(grids)
    for t in ids:
        out.extend([pad] * (math.prod(next(it)) // 4) if t == pad else [t])
    return out


def _prompt(text_before: str, n_images: int, text_after: str, pad: str = "<|image_pad|>"):
    vision = f"<|vision_start|>{pad}<|vision_end|>"
    return f"<|im_start|>user\n{text_before}{vision * n_images}{text_after}<|im_end|>\n" \
           f"<|im_start|>assistant\n"


def _hf_reference(hf_model, ids: list[int], **vision) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens, prompt log-probs [L, V]) from HF transformers."""
    x = torch.tensor([ids])
    ids_t = torch.tensor(ids)
    types = ((ids_t == token_ids()["image"]).int() + 2 * (ids_t == token_ids()["video"]).int())
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x),
              mm_token_type_ids=types.view(1, -1), **vision)
    with torch.no_grad():
        logits = hf_model(**kw).logits[0]
        out = hf_model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0)
    return out[0, len(ids):].tolist(), torch.log_softmax(logits.float(), -1)


def _check(result: dict, ids: list[int], hf_tokens: list[int], hf_logprobs: torch.Tensor
           ) -> None:
    meta = result["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert result["output_ids"] == hf_tokens
    ours = meta["input_token_logprobs"]
    assert [t for _, t, *_ in ours] == ids
    got = torch.tensor([lp for lp, *_ in ours[1:]])
    want = hf_logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    first_top = meta["output_top_logprobs"][0]
    torch.testing.assert_close(torch.tensor([lp for lp, *_ in first_top]),
                               hf_logprobs[-1].topk(len(first_top)).values, atol=1e-4, rtol=0)


SAMPLING = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}


def _generate(engine, prompt, **kwargs):
    return engine.generate(prompt, dict(SAMPLING), return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=5, **kwargs)


# (width, height): wide, tall, square, very small (below min_pixels: scaled up), and
# large (above max_pixels: scaled down).
IMAGE_SIZES = [(90, 60), (64, 150), (112, 112), (9, 7), (1400, 900)]


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_image_matches_hf(engine, hf_model, image_processor, size) -> None:
    image = make_image(*size, seed=size[0])
    prompt = _prompt("Describe ", 1, " briefly.")
    processed = image_processor(images=[image], return_tensors="pt")
    ids = _expand(vl_tokenizer().encode(prompt), processed["image_grid_thw"].tolist(),
                  token_ids()["image"])
    hf_tokens, hf_logprobs = _hf_reference(hf_model, ids, **processed)
    _check(_generate(engine, prompt, image_data=image), ids, hf_tokens, hf_logprobs)


def _image_case(image_processor, images):
    prompt = _prompt("Compare ", len(images), " and answer.")
    processed = image_processor(images=images, return_tensors="pt")
    ids = _expand(vl_tokenizer().encode(prompt), processed["image_grid_thw"].tolist(),
                  token_ids()["image"])
    return prompt, ids, processed


def test_two_images_in_one_message_matches_hf(engine, hf_model, image_processor) -> None:
    images = [make_image(90, 60, 1), make_image(50, 140, 2)]
    prompt, ids, processed = _image_case(image_processor, images)
    hf_tokens, hf_logprobs = _hf_reference(hf_model, ids, **processed)
    _check(_generate(engine, prompt, image_data=images), ids, hf_tokens, hf_logprobs)


def test_batch_of_image_and_text_requests_matches_hf(engine, hf_model, image_processor) -> None:
    """One prefill batch: the encoder runs on the items of several requests at once."""
    cases = [[make_image(70, 70, 3)], [make_image(30, 90, 4), make_image(120, 40, 5)], []]
    prompts, expected = [], []
    for images in cases:
        if images:
            prompt, ids, processed = _image_case(image_processor, images)
            expected.append((ids, *_hf_reference(hf_model, ids, **processed)))
        else:
            prompt = _prompt("No picture here, ", 0, " just text.")
            ids = vl_tokenizer().encode(prompt)
            expected.append((ids, *_hf_reference(hf_model, ids)))
        prompts.append(prompt)
    results = _generate(engine, prompts, image_data=[c or None for c in cases])
    for result, (ids, hf_tokens, hf_logprobs) in zip(results, expected):
        _check(result, ids, hf_tokens, hf_logprobs)


def test_video_frames_match_hf(engine, hf_model, ckpt) -> None:
    """A video given as its frames (2 fps assumed): the patches laid out as HF's video
    processor lays them, through the model as HF runs pixel_values_videos."""
    from transformers import AutoImageProcessor

    from radixserve.multimodal.families import QwenVideoPatcher
    from radixserve.multimodal.loading import LoadedVideo

    frames = [make_image(84, 56, 10 + i) for i in range(4)]
    ip = AutoImageProcessor.from_pretrained(ckpt)
    done = QwenVideoPatcher(ip, 128 * 28 * 28, 768 * 28 * 28, 2.0, 768)(
        LoadedVideo(frames, b"", None))
    prompt = _prompt("Watch ", 1, " and tell.", pad="<|video_pad|>")
    ids = _expand(vl_tokenizer().encode(prompt), [list(done.grid_thw)], token_ids()["video"])
    hf_tokens, hf_logprobs = _hf_reference(
        hf_model, ids, pixel_values_videos=done.pixel_values,
        video_grid_thw=torch.tensor([done.grid_thw]),
        second_per_grid_ts=torch.tensor([done.second_per_grid_t]))
    assert done.grid_thw[0] == 2 and done.second_per_grid_t == 1.0
    _check(_generate(engine, prompt, video_data=frames), ids, hf_tokens, hf_logprobs)


def test_video_patch_layout_matches_the_image_processor(ckpt) -> None:
    """A still video (every frame the same) has the patches of the image processor on
    that frame: HF repeats an image over the temporal patch the same way."""
    from transformers import AutoImageProcessor

    from radixserve.multimodal.families import QwenVideoPatcher
    from radixserve.multimodal.loading import LoadedVideo

    ip = AutoImageProcessor.from_pretrained(ckpt)
    frame = make_image(100, 70, 7)
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    done = QwenVideoPatcher(ip, size["shortest_edge"], size["longest_edge"], 2.0, 768)(
        LoadedVideo([frame, frame], b"", None))
    image = ip(images=[frame], size=size, return_tensors="pt")
    assert list(done.grid_thw) == image["image_grid_thw"][0].tolist()
    torch.testing.assert_close(done.pixel_values, image["pixel_values"], atol=0, rtol=0)


def test_chunk_boundary_inside_image_tokens(ckpt, hf_model, image_processor) -> None:
    image = make_image(112, 112, 20)  # 16 image tokens
    prompt, ids, processed = _image_case(image_processor, [image])
    first = ids.index(token_ids()["image"])
    n = ids.count(token_ids()["image"])
    chunk = first + n // 2  # the first chunk ends halfway through the image
    hf_tokens, hf_logprobs = _hf_reference(hf_model, ids, **processed)
    with _engine(ckpt, chunked_prefill_size=chunk) as e:
        _check(_generate(e, prompt, image_data=image), ids, hf_tokens, hf_logprobs)
        cache = e.scheduler.model_runner.mm_cache
        assert cache.misses == 1 and cache.hits >= 1  # encoded once, for both chunks
        assert e.scheduler.stats.total_prefill_tokens == len(ids)


def test_radix_cache_is_keyed_by_image_content(ckpt, image_processor) -> None:
    a, b = make_image(112, 112, 30), make_image(112, 112, 31)  # same size, other pixels
    prompt, ids, _ = _image_case(image_processor, [a])
    first = ids.index(token_ids()["image"])
    greedy = dict(SAMPLING)
    with _engine(ckpt) as e:
        cold = e.generate(prompt, greedy, image_data=a)
        warm = e.generate(prompt, greedy, image_data=a)
        other = e.generate(prompt, greedy, image_data=b)
        info = e.get_server_info()
    assert cold["meta_info"]["cached_tokens"] == 0
    # The same image and prompt: everything but the last prompt token comes from cache.
    assert warm["meta_info"]["cached_tokens"] == len(ids) - 1
    assert warm["output_ids"] == cold["output_ids"]
    # Another image of the same size: only the text before it is shared.
    assert other["meta_info"]["cached_tokens"] <= first
    assert info.protected_tokens == 0 and info.num_running_reqs == 0


def test_text_prompt_spelling_the_pad_token_shares_nothing_with_an_image(ckpt) -> None:
    """A text-only request whose prompt holds the pad token ids must not reuse the KV
    of an image whose placeholders are the same ids."""
    image = make_image(112, 112, 40)
    prompt = _prompt("Same ", 1, " text.")
    with _engine(ckpt) as e:
        with_image = e.generate(prompt, dict(SAMPLING), image_data=image)
        ids = list(vl_tokenizer().encode(prompt))
        pad = token_ids()["image"]
        n = with_image["meta_info"]["prompt_tokens"] - len(ids) + 1
        i = ids.index(pad)
        spelled = ids[:i] + [pad] * n + ids[i + 1:]
        text_only = e.generate(input_ids=spelled, sampling_params=dict(SAMPLING))
    assert text_only["meta_info"]["cached_tokens"] <= i


def test_mixed_batch_decode_rows_carry_the_rope_delta(ckpt, hf_model, image_processor) -> None:
    """With --enable-mixed-chunk a running image request decodes inside the forwards
    that prefill the next one in chunks: its decode rows need position + rope_delta."""
    images = [make_image(112, 112, 50), make_image(84, 140, 51)]
    cases = [_image_case(image_processor, [img]) for img in images]
    expected = [_hf_reference(hf_model, ids, **processed) for _, ids, processed in cases]
    with _engine(ckpt, enable_mixed_chunk=True, chunked_prefill_size=12) as e:
        results = _generate(e, [c[0] for c in cases], image_data=images)
    for result, (_, ids, _), (hf_tokens, hf_logprobs) in zip(results, cases, expected):
        _check(result, ids, hf_tokens, hf_logprobs)


def test_both_checkpoint_layouts_load_the_same(ckpt, tmp_path) -> None:
    """transformers 5.24 saves `visual.*` and `model.*` (the language model) at the top;
    its in-memory layout, which other tools save, nests them as `model.visual.*` and
    `model.language_model.*`. Both load to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    nested = tmp_path / "nested_layout"
    shutil.copytree(ckpt, nested)
    for f in nested.glob("*.safetensors"):
        tensors = load_file(f)
        assert any(k.startswith("visual.") for k in tensors)
        renamed = {("model." + k if k.startswith("visual.") else
                    "model.language_model." + k[len("model."):] if k.startswith("model.")
                    else k): v for k, v in tensors.items()}
        save_file(renamed, f, metadata={"format": "pt"})
    for index in nested.glob("*.index.json"):
        index.unlink()
    image = make_image(90, 60, 60)
    prompt = _prompt("Describe ", 1, ".")
    with _engine(nested) as e:
        got = e.generate(prompt, dict(SAMPLING), image_data=image)
    with _engine(ckpt) as e:
        want = e.generate(prompt, dict(SAMPLING), image_data=image)
    assert got["output_ids"] == want["output_ids"]


def test_dummy_weights_with_the_shared_7b_config_shrunk(tmp_path) -> None:
    """The real Qwen2.5-VL-7B config.json (older flat layout), shrunk: builds with
    --load-format dummy and runs an image request with token-id prompts."""
    import json

    src = Path(__file__).resolve().parents[2] / "shared" / "model_configs" / "qwen2.5-vl-7b"
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg["rope_scaling"]["mrope_section"] = [2, 3, 3]
    cfg["vision_config"].update(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                out_hidden_size=64, fullatt_block_indexes=[1])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    import radixserve as rs

    ids = [cfg["vision_start_token_id"], cfg["image_token_id"], cfg["vision_end_token_id"],
           1000, 2000, 3000]
    with rs.Engine(model_path=str(tmp_path), load_format="dummy", skip_tokenizer_init=True,
                   dtype="float32", max_total_tokens=4096) as e:
        out = e.generate(input_ids=ids, sampling_params=dict(SAMPLING),
                         image_data=make_image(100, 100, 0))
    # The default processor (no preprocessor_config.json): 100x100 -> 112x112 -> 16 tokens.
    assert out["meta_info"]["prompt_tokens"] == len(ids) - 1 + 16
    assert len(out["output_ids"]) == NEW_TOKENS


def test_animated_gif_video_is_sampled_at_2_fps(engine, hf_model, ckpt) -> None:
    """An animated image as video_data: its frames decoded by PIL, sampled as HF's
    sample_frames does (8 frames at 10 fps -> 4 frames), seconds per temporal patch
    from the sampled rate (0.4 s), through the model as HF runs it."""
    import base64
    import io

    from PIL import Image, ImageSequence
    from transformers import AutoImageProcessor

    from radixserve.multimodal.families import QwenVideoPatcher
    from radixserve.multimodal.loading import LoadedVideo

    frames = [make_image(84, 56, 70 + i) for i in range(8)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100,
                   loop=0)
    decoded = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(buf))]
    ip = AutoImageProcessor.from_pretrained(ckpt)
    done = QwenVideoPatcher(ip, 128 * 28 * 28, 768 * 28 * 28, 2.0, 768)(
        LoadedVideo([decoded[i] for i in (0, 2, 4, 6)], b"", None))
    prompt = _prompt("Watch ", 1, " now.", pad="<|video_pad|>")
    ids = _expand(vl_tokenizer().encode(prompt), [list(done.grid_thw)], token_ids()["video"])
    hf_tokens, hf_logprobs = _hf_reference(
        hf_model, ids, pixel_values_videos=done.pixel_values,
        video_grid_thw=torch.tensor([done.grid_thw]), second_per_grid_ts=torch.tensor([0.4]))
    url = "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()
    _check(_generate(engine, prompt, video_data=url), ids, hf_tokens, hf_logprobs)


def test_mm_process_config_sets_the_pixel_budget(ckpt) -> None:
    image = make_image(1400, 900, 80)  # the folder's processor allows 64 tokens
    prompt = _prompt("Look ", 1, ".")
    base = len(vl_tokenizer().encode(prompt)) - 1
    with _engine(ckpt, mm_process_config='{"image": {"max_pixels": 12544}}') as e:
        out = e.generate(prompt, {"max_new_tokens": 1}, image_data=image)
    assert out["meta_info"]["prompt_tokens"] - base <= 12544 // (28 * 28)
    with pytest.raises(ValueError, match="mm_process_config.image"):
        _engine(ckpt, mm_process_config='{"image": {"resize": 3}}')


def test_embedding_cache_is_lru_and_bounded() -> None:
    from radixserve.multimodal.cache import EmbeddingCache

    cache = EmbeddingCache(max_bytes=3 * 4 * 10)  # three [10] float32 entries
    for key in range(3):
        cache.put(key, torch.zeros(10))
    assert cache.get(0) is not None  # 0 is now the most recent
    cache.put(3, torch.zeros(10))  # evicts 1, the least recently used
    assert cache.get(1) is None and cache.get(2) is not None and len(cache) == 3
    cache.put(9, torch.zeros(100))  # larger than the whole cache: not kept
    assert cache.get(9) is None and cache.used_bytes == 3 * 40


def test_decode_inputs_offset_positions_by_rope_delta() -> None:
    """The block the eager decode and the CUDA-graph replay both copy to the device."""
    from radixserve.core.forward_batch import fill_decode_inputs
    from radixserve.core.req import Req
    from radixserve.core.sampling_params import SamplingParams

    reqs = []
    for i, delta in enumerate((0, -7, 12)):
        r = Req(f"r{i}", [1, 2, 3], SamplingParams())
        r.output_ids, r.kv_committed_len, r.req_pool_idx, r.rope_delta = [5], 3 + i, i, delta
        reqs.append(r)
    host = torch.zeros(5, 3, dtype=torch.int64)
    fill_decode_inputs(host, reqs, torch.tensor([7, 8, 9]), None, rope_deltas=True)
    assert host[1].tolist() == [3, 4 - 7, 5 + 12]  # positions: seq position + delta
    assert host[3].tolist() == [4, 5, 6]  # seq_lens are not offset
    fill_decode_inputs(host, reqs, torch.tensor([7, 8, 9]), None)
    assert host[1].tolist() == [3, 4, 5]
