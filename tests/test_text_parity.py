"""The MLX text decoder against transformers on tiny random checkpoints of every variant."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4.loader import load_model
from tiny_checkpoints import VARIANTS

WINDOW = 16
PROMPT_LEN = 3 * WINDOW  # longer than the sliding window, prefilled in one pass


def prompt_ids(vocab_size: int, length: int = PROMPT_LEN, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(4, vocab_size, size=(1, length)).astype(np.int32)


def mlx_logits(model, ids: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), cache).astype(mx.float32))


def greedy_mlx(model, ids: np.ndarray, steps: int) -> list:
    cache = model.make_cache()
    logits = model(mx.array(ids), cache)
    out = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1)
        out.append(token.item())
        logits = model(token[None], cache)
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(request.param, sliding_window=WINDOW)
    return request.param, load_model(path), hf_model(path)


def test_prefill_logits_match_transformers(pair):
    _, model, hf = pair
    ids = prompt_ids(hf.config.text_config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    got = mlx_logits(model, ids)
    scale = np.abs(ref).max()
    assert scale > 1.0, "logits too small to be a meaningful comparison"
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuation_past_window_matches_transformers(pair):
    _, model, hf = pair
    ids = prompt_ids(hf.config.text_config.vocab_size)
    steps = 32
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(ids).long(), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, ids.shape[1]:].tolist()
    assert greedy_mlx(model, ids, steps) == ref


# (3, 16, 16, 5): chunks of exactly the window after others, as the default
# 512-token prefill steps are on a model with a 512-token window.
@pytest.mark.parametrize("chunks", [(7, 1, 11, 29), (1, 17, 13, 17), (5, 3, 3, 3, 3, 31), (3, 16, 16, 5)])
def test_chunked_prefill_through_cache_equals_one_call(pair, chunks):
    _, model, hf = pair
    ids = prompt_ids(hf.config.text_config.vocab_size, length=sum(chunks))
    whole = mlx_logits(model, ids)
    cache, parts, start = model.make_cache(), [], 0
    for size in chunks:
        parts.append(mlx_logits(model, ids[:, start:start + size], cache))
        start += size
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_sliding_cache_memory_is_bounded_by_window(pair):
    variant, model, hf = pair
    cache = model.make_cache()
    ids = prompt_ids(hf.config.text_config.vocab_size, length=5 * WINDOW)
    for start in range(0, ids.shape[1], 8):
        model(mx.array(ids[:, start:start + 8]), cache)
    for step in range(3):
        model(mx.array([[5 + step]]), cache)
    text = model.config.text_config
    for i, layer_cache in enumerate(cache):
        kept = layer_cache.keys.shape[2]
        if text.is_sliding(i):
            assert kept <= WINDOW + 8, (variant, i, kept)
    assert len(cache) == text.num_hidden_layers - text.num_kv_shared_layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_checkpoint_runs_within_bfloat16_noise(tiny_checkpoint, hf_model, variant):
    """Real checkpoints are bfloat16. Random tiny weights have near-tied logits,
    so bfloat16 flips some argmaxes in transformers too (about 1 in 10 on E2B):
    the bar is transformers' own bfloat16 error against its float32 run."""
    from transformers import Gemma4ForConditionalGeneration

    path = tiny_checkpoint(variant, dtype="bfloat16", sliding_window=WINDOW)
    ours = load_model(path, dtype="bfloat16")  # the default computes in float32 on the CPU
    assert ours.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    ids = prompt_ids(ours.config.text_config.vocab_size)
    hf16 = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref32 = hf_model(path)(torch.from_numpy(ids).long()).logits.numpy()
        ref16 = hf16(torch.from_numpy(ids).long()).logits.float().numpy()
    got = mlx_logits(ours, ids)
    hf_noise, our_noise = np.abs(ref16 - ref32), np.abs(got - ref32)
    assert our_noise.mean() <= 1.5 * hf_noise.mean()
    top2 = np.sort(ref32[0], axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * hf_noise.max()
    agree = got.argmax(-1)[0] == ref32.argmax(-1)[0]
    assert decisive.sum() >= 3 or variant == "26b"  # the MoE's near-tied experts leave no position decisive
    assert agree[decisive].all()


def test_decode_over_a_long_cache_matches_transformers(pair, monkeypatch):
    """A prefill and a decode step over a cache long enough for the CPU route to
    split their attention heads over the CPU streams (`attention.attend`)."""
    from mlx_gemma4 import attention
    from mlx_gemma4 import streams as streams_module

    _, model, hf = pair
    streams = (None, mx.new_stream(mx.cpu))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    joined = []
    join = streams_module.join
    monkeypatch.setattr(streams_module, "join", lambda parts, axis: joined.append(axis) or join(parts, axis))
    ids = prompt_ids(hf.config.text_config.vocab_size, attention.SPLIT_ATTENTION_MIN_SCORES + 1)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits[:, -1].numpy()
    cache = model.make_cache()
    mx.eval(model(mx.array(ids[:, :-1]), cache))
    assert 1 in joined  # some layer's heads were split
    joined.clear()
    got = mlx_logits(model, ids[:, -1:], cache)[:, -1]
    assert 1 in joined
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)
