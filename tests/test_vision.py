"""The vision tower, image prompts and video prompts against transformers on tiny random checkpoints.

E2B-style towers clip their linears, 26B/31B-style towers standardise their output; the 26B/31B text models attend
bidirectionally inside each image block on sliding layers (and causally on global layers), which only shows when an
image block is longer than the sliding window: the tiny checkpoints' window is 16, their image blocks are ~60 tokens.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_gemma4 import load
from mlx_gemma4 import vision
from mlx_gemma4.image_processing import ImageInputError
from mlx_gemma4.generate import stream_generate
from mlx_gemma4.model import merge_features
from mlx_gemma4.prefill import block_spans
from mlx_gemma4.vision import VisionTower

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

WINDOW = 16


def image(seed: int, height: int = 50, width: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["e2b", "26b", "31b"])
def pair(request, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(request.param, sliding_window=WINDOW)
    model, processor = load(path)
    return request.param, path, model, processor, hf_model(path)


def hf_image_inputs(path, images, budget=None):
    params = json.loads((path / "processor_config.json").read_text())["image_processor"]
    params.pop("image_processor_type")
    if budget is not None:
        params["max_soft_tokens"] = budget
    out = Gemma4ImageProcessorPil(**params)(images, return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"]


def chat_prompt(processor, n_images: int, question: str = "What is in this picture? Tell me a story about it.") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


# 16: the CPU's blocks of queries (`vision.attend_in_blocks`), which only
# images of more than CPU_QUERY_BLOCK patches take otherwise.
@pytest.mark.parametrize("query_block", [vision.CPU_QUERY_BLOCK, 16])
def test_vision_tower_matches_transformers(pair, query_block, monkeypatch):
    monkeypatch.setattr(vision, "CPU_QUERY_BLOCK", query_block)
    variant, path, model, processor, hf = pair
    images = [image(1), image(2, 90, 40), image(3, 16, 16)]
    pixels, positions = hf_image_inputs(path, images)
    with torch.no_grad():
        tower = hf.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state.numpy()
        projected = torch.cat(hf.model.get_image_features(pixels, positions).pooler_output).numpy()
    encoded = model.vision_tower(mx.array(pixels.numpy()), mx.array(positions.numpy()))
    ours_tower = np.concatenate([np.array(x) for x in encoded])
    model.encoder_outputs.clear()
    ours = np.array(model.encode_vision(mx.array(pixels.numpy()), mx.array(positions.numpy())))
    for got, want in ((ours_tower, tower), (ours, projected)):
        assert got.shape == want.shape
        error = np.abs(got - want).max() / np.abs(want).max()
        print(f"{variant}: max |delta| relative {error:.2e}")
        assert error <= 1e-4


def test_many_images_go_through_the_tower_in_groups_of_bounded_patches(pair, monkeypatch):
    variant, path, model, processor, hf = pair
    pixels, positions = (mx.array(x.numpy()) for x in hf_image_inputs(path, [image(30 + i) for i in range(5)]))
    calls = []
    tower = type(model.vision_tower).__call__
    monkeypatch.setattr(type(model.vision_tower), "__call__",
                        lambda self, p, q: calls.append(p.shape[0]) or tower(self, p, q))
    model.encoder_outputs.clear()
    whole = np.array(model.encode_vision(pixels, positions))
    monkeypatch.setattr(vision, "PATCHES_PER_CALL", 2 * pixels.shape[1] + 1)
    model.encoder_outputs.clear()
    grouped = np.array(model.encode_vision(pixels, positions))
    assert calls == [5, 2, 2, 1]
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


def test_image_prompt_logits_and_greedy_continuation_match_transformers(pair):
    variant, path, model, processor, hf = pair
    images = [image(4), image(5, 60, 60)]
    inputs = processor(chat_prompt(processor, 2), images=images)
    ids = np.array(inputs["input_ids"])
    image_id = processor.convert_tokens_to_ids("<|image|>")
    assert (ids == image_id).sum() > 2 * WINDOW  # both blocks longer than the sliding window
    pixels, positions = hf_image_inputs(path, images)
    np.testing.assert_allclose(np.array(inputs["pixel_values"]), pixels.numpy(), rtol=0, atol=1e-6)
    hf_inputs = dict(input_ids=torch.from_numpy(ids).long(), pixel_values=pixels, image_position_ids=positions,
                     mm_token_type_ids=torch.from_numpy(np.array(inputs["mm_token_type_ids"])).long())
    with torch.no_grad():
        ref = hf(**hf_inputs).logits.numpy()
        hf_features = torch.cat(hf.model.get_image_features(pixels, positions).pooler_output).numpy()
    got = np.array(model(inputs["input_ids"], **model_inputs(inputs)))
    error = np.abs(got - ref).max() / np.abs(ref).max()
    # The decoder alone, fed transformers' own image features.
    text_ids = model.text_ids(inputs["input_ids"])
    embeddings = merge_features(model.language_model.model.embed(text_ids), inputs["input_ids"],
                                model.config.image_token_id, mx.array(hf_features), "image")
    same_features = np.array(model.language_model(text_ids, None, embeddings, model.vision_blocks(
        inputs["input_ids"], inputs["mm_token_type_ids"])))
    decoder_error = np.abs(same_features - ref).max() / np.abs(ref).max()
    print(f"{variant}: image+text logits max |delta| relative {error:.2e} "
          f"(decoder on the same features {decoder_error:.2e})")
    assert decoder_error <= 1e-4
    # The random tiny E2B decoder amplifies the towers' ~2e-6 float32 rounding differences about 100x
    # (transformers' own logits move by ~2e-4 under 2e-6 relative noise on its image features).
    assert error <= (1e-4 if variant != "e2b" else 1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    steps = 16
    with torch.no_grad():
        want = hf.generate(**hf_inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    cache = model.make_cache()
    logits = model(inputs["input_ids"], cache, **model_inputs(inputs))
    tokens = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache)
    assert tokens == want


def test_bidirectional_blocks_only_on_models_that_use_them(pair):
    """26B/31B: causal-only attention over the image gives other logits; E2B: identical."""
    variant, path, model, processor, hf = pair
    inputs = processor(chat_prompt(processor, 1), images=[image(6)])
    ids = inputs["input_ids"]
    with_blocks = np.array(model(ids, **model_inputs(inputs)))
    causal = {**model_inputs(inputs), "mm_token_type_ids": mx.zeros_like(inputs["mm_token_type_ids"])}
    without = np.array(model(ids, **causal))
    if variant == "e2b":
        np.testing.assert_array_equal(with_blocks, without)
    else:
        assert np.abs(with_blocks - without).max() > 1e-2


def test_prefill_in_chunks_around_the_image_equals_one_call(pair):
    variant, path, model, processor, hf = pair
    inputs = processor(chat_prompt(processor, 1), images=[image(7)])
    ids = np.array(inputs["input_ids"])
    whole = np.array(model(inputs["input_ids"], **model_inputs(inputs)))
    types = np.array(inputs["mm_token_type_ids"])
    split = int(np.flatnonzero(types[0])[0]) - 2  # text before the image, then the image and the rest
    cache = model.make_cache()
    first = np.array(model(mx.array(ids[:, :split]), cache))
    second = np.array(model(mx.array(ids[:, split:]), cache, pixel_values=inputs["pixel_values"],
                            image_position_ids=inputs["image_position_ids"],
                            mm_token_type_ids=mx.array(types[:, split:])))
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=0, atol=1e-4 * np.abs(whole).max())
    if variant != "e2b":  # splitting a bidirectional block would silently change the logits: refused
        inside = int(np.flatnonzero(types[0])[0]) + 3
        with pytest.raises(ValueError, match="block is split across model calls"):
            model(mx.array(ids[:, :inside]), model.make_cache(), pixel_values=inputs["pixel_values"],
                  image_position_ids=inputs["image_position_ids"])


def test_image_prompts_stream_in_chunks_that_keep_each_block_whole(pair, monkeypatch):
    """`stream_generate` with images prefills in 8-token chunks; on 26B/31B (bidirectional blocks of ~60 tokens)
    a chunk ends before a block and the next takes it whole, on E2B chunks cut through the images. The greedy
    tokens are transformers'."""
    variant, path, model, processor, hf = pair
    images = [image(8), image(9, 60, 60)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare this one"},
                                             {"type": "image"}, {"type": "text", "text": "with that one."}]}]
    inputs = processor(processor.apply_chat_template(messages), images=images)
    ids = np.array(inputs["input_ids"])
    calls = []
    call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__", lambda self, x, *a, **k: calls.append(x.shape[1]) or call(
        self, x, *a, **k))
    steps = 8
    responses = list(stream_generate(model, processor, messages, images=images, max_tokens=steps,
                                     stop_tokens=set(), prefill_step_size=8, return_logprobs=True))
    chunks = calls[:-steps - 1]  # then the last prompt token and one step ahead per token
    assert sum(chunks) == ids.shape[1] - 1
    ends = set(np.cumsum(chunks).tolist())
    spans = block_spans(model.vision_blocks(mx.array(ids), inputs["mm_token_type_ids"]))
    if variant == "e2b":
        assert not spans and max(chunks) == 8
    else:
        assert len(spans) == 2 and all(last - first > 8 for first, last in spans)
        assert all(first in ends and last in ends and not ends & set(range(first + 1, last))
                   for first, last in spans)
    hf_inputs = dict(input_ids=torch.from_numpy(ids).long(),
                     pixel_values=torch.from_numpy(np.array(inputs["pixel_values"])),
                     image_position_ids=torch.from_numpy(np.array(inputs["image_position_ids"])).long(),
                     mm_token_type_ids=torch.from_numpy(np.array(inputs["mm_token_type_ids"])).long())
    with torch.no_grad():
        first = torch.log_softmax(hf(**hf_inputs).logits[0, -1], dim=-1).numpy()
        want = hf.generate(**hf_inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = np.array(responses[0].logprobs)
    # E2B's random decoder amplifies the towers' float32 rounding (see the image-prompt test above).
    assert np.abs(got - first).max() <= (1e-4 if variant != "e2b" else 1e-3) * np.abs(first).max()
    assert [r.token for r in responses] == want


def test_different_images_give_different_logits(pair):
    variant, path, model, processor, hf = pair
    prompt = chat_prompt(processor, 1)
    a, b = (processor(prompt, images=[image(seed)]) for seed in (8, 9))
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    logits_a = np.array(model(a["input_ids"], **model_inputs(a))[:, -1])
    logits_b = np.array(model(b["input_ids"], **model_inputs(b))[:, -1])
    assert np.abs(logits_a - logits_b).max() > 1e-2


def test_each_image_is_encoded_once(pair, monkeypatch):
    variant, path, model, processor, hf = pair
    calls = []
    original = VisionTower.__call__
    monkeypatch.setattr(VisionTower, "__call__", lambda self, p, q: calls.append(p.shape[0]) or original(self, p, q))
    model.encoder_outputs.clear()
    first = processor(chat_prompt(processor, 1), images=[image(10)])
    model(first["input_ids"], **model_inputs(first))
    second = processor(chat_prompt(processor, 2), images=[image(10), image(11)])
    model(second["input_ids"], **model_inputs(second))
    model(second["input_ids"], **model_inputs(second))
    assert calls == [1, 1]  # the second turn encodes only the new image, the third nothing


def test_every_budget_gives_its_token_count(pair):
    variant, path, model, processor, hf = pair
    for budget in (70, 140, 280):
        inputs = processor(chat_prompt(processor, 1), images=[image(12, 200, 300)], image_token_budget=budget)
        count = int((np.array(inputs["input_ids"]) == processor.convert_tokens_to_ids("<|image|>")).sum())
        assert budget // 2 < count <= budget
    with pytest.raises(ImageInputError, match="budget 100 is not supported"):
        processor(chat_prompt(processor, 1), images=[image(12)], image_token_budget=100)


def test_float16_tower_runs_in_float32(tiny_checkpoint):
    """Activations past 65504 become inf in float16: the tower computes in float32 whatever the text dtype."""
    path = tiny_checkpoint("31b", sliding_window=WINDOW)
    model16, processor = load(path, dtype="float16")
    model32, _ = load(path)
    for model in (model16, model32):  # push the activations far past the float16 range
        embedder = model.vision_tower.patch_embedder
        embedder.input_proj.weight = embedder.input_proj.weight * 20000
    inputs = processor(chat_prompt(processor, 1), images=[image(13)])
    pixels, positions = inputs["pixel_values"], inputs["image_position_ids"]
    tower32 = model32.vision_tower(pixels, positions)[0]
    assert np.isinf(np.array(tower32.astype(mx.float16))).any()  # float16 activations would overflow
    assert model16.vision_tower.compute_dtype() == mx.float32
    got = np.array(model16.encode_vision(pixels, positions).astype(mx.float32))
    want = np.array(model32.encode_vision(pixels, positions))
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    logits = model16(inputs["input_ids"], **model_inputs(inputs))
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()


def test_video_prompt_matches_transformers(tiny_checkpoint, hf_model):
    """A list of frames as a video: same token layout as transformers' processor (timestamps at its assumed 24 fps),
    same logits."""
    path = tiny_checkpoint("26b", sliding_window=WINDOW)
    model, processor = load(path)
    frames = [image(20 + i, 40, 56) for i in range(3)]
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = processor(prompt, videos=frames)
    pixels, positions = hf_image_inputs(path, frames)
    per_frame = int((positions[0, :, 0] >= 0).sum()) // 4
    block = "<|image>" + "<|video|>" * per_frame + "<image|>"
    expected = prompt.replace("<|video|>", " ".join(f"00:00 {block}" for _ in frames))
    assert inputs["input_ids"][0].tolist() == processor.encode(expected)
    ids = torch.tensor([processor.encode(expected)])
    hf = hf_model(path)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=pixels, video_position_ids=positions,
                 num_frames_per_video=torch.tensor([3]),
                 mm_token_type_ids=torch.from_numpy(np.array(inputs["mm_token_type_ids"])).long()).logits.numpy()
    got = np.array(model(inputs["input_ids"], **model_inputs(inputs)))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_images_on_a_text_only_checkpoint_are_refused(tiny_checkpoint):
    path = tiny_checkpoint("e2b", with_towers=False, sliding_window=WINDOW)
    model, processor = load(path)
    with pytest.raises(ValueError, match="no image processor config"):
        processor(chat_prompt(processor, 1), images=[image(14)])
    _, vision_processor = load(tiny_checkpoint("e2b", sliding_window=WINDOW))
    inputs = vision_processor(chat_prompt(processor, 1), images=[image(14)])
    with pytest.raises(ValueError, match="no vision encoder .* cannot take image input"):
        model(inputs["input_ids"], **model_inputs(inputs))


def test_mismatched_inputs_are_clear_errors(tiny_checkpoint):
    model, processor = load(tiny_checkpoint("e2b", sliding_window=WINDOW))
    with pytest.raises(ImageInputError, match="has 1 image placeholder.* but 2 image"):
        processor(chat_prompt(processor, 1), images=[image(15), image(16)])
    with pytest.raises(ImageInputError, match="has 0 image placeholder"):
        processor("no placeholder here", images=[image(15)])
    inputs = processor(chat_prompt(processor, 2), images=[image(15), image(16)])
    with pytest.raises(ValueError, match="placeholder tokens but the image inputs give"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"][:1],
              image_position_ids=inputs["image_position_ids"][:1])
    with pytest.raises(ValueError, match="need their position ids"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("variant,layers", [("e2b", 16), ("26b", 27)])
def test_full_depth_vision_tower_stays_with_transformers(tmp_path, monkeypatch, variant, layers):
    """The real encoders' depth (16 / 27 layers): float32 rounding grows with
    depth (1e-4 relative at 27 layers), it must not drift further."""
    import tiny_checkpoints

    shallow = tiny_checkpoints.vision_config
    monkeypatch.setattr(tiny_checkpoints, "vision_config", lambda v: {**shallow(v), "num_hidden_layers": layers})
    path = tiny_checkpoints.build_checkpoint(tmp_path / variant, variant)
    from transformers import Gemma4ForConditionalGeneration

    hf = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model, _ = load(path, dtype="float32")
    pixels, positions = hf_image_inputs(path, [image(1), image(2, 90, 40)])
    with torch.no_grad():
        want = torch.cat(hf.model.get_image_features(pixels, positions).pooler_output).numpy()
    got = np.array(model.encode_vision(mx.array(pixels.numpy()), mx.array(positions.numpy())))
    assert np.abs(got - want).max() / np.abs(want).max() <= 2e-4
