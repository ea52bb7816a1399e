"""The MLX audio encoder and audio+text path against transformers on the tiny random E2B checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.audio import AudioEncoder
from mlx_gemma4.audio_features import AudioError
from mlx_gemma4.generate import stream_generate
from mlx_gemma4.loader import load, load_model, read_weights
from mlx_gemma4.speech import transcribe, translate

RATE = 16_000
SPEECH = Path(__file__).parent / "fixtures" / "speech.wav"
STEPS = 16


def clip(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    return (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def e2b(tiny_checkpoint, hf_model):
    path = tiny_checkpoint("e2b")
    model, processor = load(path)
    return path, model, processor, hf_model(path)


def hf_audio_features(hf, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = hf.model.get_audio_features(torch.from_numpy(features), torch.from_numpy(mask), return_dict=True)
    return out.pooler_output.numpy(), out.attention_mask.numpy()


def test_audio_tower_matches_transformers(e2b):
    _, model, processor, hf = e2b
    features, mask = processor.audio_feature_extractor([clip(16_007), clip(40_000, 1), clip(3_000, 2)])
    ref, ref_mask = hf_audio_features(hf, features, mask)
    states, got_mask = model.audio_tower(mx.array(features), mx.array(mask))
    got = np.array(model.embed_audio(states))
    np.testing.assert_array_equal(np.array(got_mask), ref_mask)
    scale = np.abs(ref[ref_mask]).max()
    assert scale > 0.1
    assert np.abs(got - ref)[ref_mask].max() <= 1e-4 * scale


def test_encoder_drops_padding_and_counts_like_the_processor(e2b):
    _, model, processor, _ = e2b
    extractor = processor.audio_feature_extractor
    lengths = [16_007, 40_000, 3_000]
    features, mask = extractor([clip(n) for n in lengths])
    tokens = model.encode_audio(mx.array(features), mx.array(mask))
    assert tokens.shape == (sum(extractor.num_audio_tokens(n) for n in lengths), model.config.text_config.hidden_size)


def test_converted_conv_layouts_load_the_same(e2b):
    path, model, _, _ = e2b
    weights = read_weights(path)
    converted = {}
    for key, value in weights.items():
        if key.endswith("subsample_conv_projection.layer0.conv.weight") or key.endswith("layer1.conv.weight"):
            value = value.transpose(0, 2, 3, 1)  # mlx-vlm's stored layout
        elif key.endswith("depthwise_conv1d.weight"):
            value = value.transpose(0, 2, 1)
        converted[key] = value
    a, b = model.sanitize(weights), model.sanitize(converted)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and mx.array_equal(a[key], b[key]).item(), key
    again = model.sanitize(a)
    assert all(mx.array_equal(again[k], a[k]).item() for k in a)


@pytest.mark.parametrize("n", [15_999, 16_000, 16_007, 16_159, 16_161, 16_321, 8_000 + 13])
def test_placeholder_expansion_matches_transformers(e2b, n):
    """Each clip becomes boa + N placeholders + eoa, N as Gemma4Processor.replace_audio_token counts it."""
    from transformers import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    _, _, processor, _ = e2b
    names = ("audio_token", "boa_token", "eoa_token")
    tokens = SimpleNamespace(**{name: processor.special_tokens[name] for name in names})
    clips = [clip(n), clip(n + 777, 1)]
    prompt = f"a{tokens.audio_token}b{tokens.audio_token}c"
    out = processor(prompt, audio=clips, return_tensors="np")
    hf_features = Gemma4AudioFeatureExtractor()(clips, return_tensors="np")
    expected = "a{}b{}c".format(
        *(Gemma4Processor.replace_audio_token(tokens, hf_features, i) for i in range(len(clips)))
    )
    assert out["input_ids"][0].tolist() == processor.encode(expected)
    np.testing.assert_array_equal(out["input_features_mask"], hf_features["input_features_mask"])


def test_audio_prompt_logits_and_greedy_continuation_match_transformers(e2b):
    _, model, processor, hf = e2b
    messages = [{"role": "user", "content": [
        {"type": "audio"}, {"type": "text", "text": "What is said?"}, {"type": "audio"}]}]
    inputs = processor(processor.apply_chat_template(messages), audio=[clip(16_007), (clip(30_000, 1), 48_000)],
                       return_tensors="np")
    ids, features, mask = inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"]
    torch_inputs = dict(input_ids=torch.from_numpy(ids).long(), input_features=torch.from_numpy(features),
                        input_features_mask=torch.from_numpy(mask))
    with torch.no_grad():
        ref = hf(**torch_inputs).logits.numpy()
        ref_tokens = hf.generate(**torch_inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    cache = model.make_cache()
    logits = model(mx.array(ids), cache, input_features=mx.array(features), input_features_mask=mx.array(mask))
    got = np.array(logits)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    tokens = []
    for _ in range(STEPS):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache)
    assert tokens == ref_tokens


def test_audio_prompt_streams_in_chunks_and_matches_transformers(e2b):
    """`stream_generate` with two clips, prefilled in 8-token chunks that cut through them: the first token's
    log-probabilities and the greedy tokens are transformers'."""
    _, model, processor, hf = e2b
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Same words?"},
                                             {"type": "audio"}]}]
    clips = [clip(12_000, 2), clip(9_000, 3)]
    inputs = processor(processor.apply_chat_template(messages), audio=clips, return_tensors="np")
    torch_inputs = dict(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                        input_features=torch.from_numpy(inputs["input_features"]),
                        input_features_mask=torch.from_numpy(inputs["input_features_mask"]))
    with torch.no_grad():
        first = torch.log_softmax(hf(**torch_inputs).logits[0, -1], dim=-1).numpy()
        want = hf.generate(**torch_inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
    responses = list(stream_generate(model, processor, messages, audio=clips, max_tokens=STEPS, stop_tokens=set(),
                                     prefill_step_size=8, return_logprobs=True))
    got = np.array(responses[0].logprobs)
    assert np.abs(got - first).max() <= 1e-4 * np.abs(first).max()
    assert [r.token for r in responses] == want


def test_speech_recording_runs_through_the_whole_path(e2b):
    _, model, processor, _ = e2b
    text = transcribe(model, processor, str(SPEECH), max_tokens=4)
    assert isinstance(text, str)
    assert isinstance(translate(model, processor, SPEECH, target_language="French", max_tokens=2), str)


def test_long_clip_needs_chunking(e2b):
    _, model, processor, _ = e2b
    rng = np.random.default_rng(0)
    speech = [0.3 * rng.standard_normal(int(s * RATE)) for s in (20, 12)]
    long_clip = np.concatenate([speech[0], np.zeros(RATE // 2), speech[1]]).astype(np.float32)
    with pytest.raises(AudioError, match="at most 30 s"):
        transcribe(model, processor, long_clip, max_tokens=1)
    with pytest.raises(AudioError, match="at most 30 s"):
        processor(processor.special_tokens["audio_token"], audio=long_clip)
    assert isinstance(transcribe(model, processor, long_clip, chunking=True, max_tokens=1), str)


def test_placeholder_count_mismatch_is_a_clear_error(e2b):
    _, _, processor, _ = e2b
    with pytest.raises(AudioError, match="1 audio placeholder.*2 audio clip"):
        processor(processor.special_tokens["audio_token"], audio=[clip(16_000), clip(16_000)])


def test_audio_for_a_model_without_audio_encoder(tiny_checkpoint, e2b):
    model, processor = load(tiny_checkpoint("26b"))
    with pytest.raises(AudioError, match="no audio encoder"):
        processor("<|audio|>", audio=clip(16_000))
    features = np.zeros((1, 100, 128), dtype=np.float32)
    with pytest.raises(ValueError, match="no audio encoder"):
        model(mx.array([[1, 2]]), input_features=mx.array(features))
    text_only = load_model(e2b[0], text_only=True)
    with pytest.raises(ValueError, match="no audio encoder"):
        text_only.encode_audio(mx.array(features))


def test_sanitize_conv_weight_handles_both_layouts():
    from mlx_gemma4.audio import AudioConfig

    config = AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         subsampling_conv_channels=[128, 8], output_proj_dims=32)
    torch_layout = mx.zeros((8, 128, 3, 3))
    mlx_layout = AudioEncoder.sanitize_conv_weight("audio_tower.subsample_conv_projection.layer1.conv.weight",
                                                   torch_layout, config)
    assert mlx_layout.shape == (8, 3, 3, 128)
    assert AudioEncoder.sanitize_conv_weight("audio_tower.subsample_conv_projection.layer1.conv.weight",
                                             mlx_layout, config).shape == (8, 3, 3, 128)
    depthwise = AudioEncoder.sanitize_conv_weight("audio_tower.layers.0.lconv1d.depthwise_conv1d.weight",
                                                  mx.zeros((32, 1, 5)), config)
    assert depthwise.shape == (32, 5, 1)
