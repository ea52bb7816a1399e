"""Quantized caches of the global layers (`kv_bits`): attention over the packed keys and values."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import precision
from mlx_gemma4.cache import KVCache, QuantizedKVCache, RotatingKVCache
from mlx_gemma4.loader import load_model
from tiny_checkpoints import VARIANTS

GROUP = 32  # the tiny models' global head dim
CHUNKS = (7, 40, 13)  # 40 queries x 47 keys: the heads are split over the CPU streams


class DequantizedKVCache(KVCache):
    """A float cache holding what a quantized one holds, dequantized: the reference for its attention."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def _stored(self, x: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(x, GROUP, self.bits), group_size=GROUP, bits=self.bits)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tiny_checkpoint):
    return load_model(tiny_checkpoint(request.param, sliding_window=16, with_towers=False))


def run(model, cache, seed: int = 1) -> np.ndarray:
    """Logits of a chunked prompt past the window, then of 4 decode steps."""
    ids = np.random.default_rng(seed).integers(4, model.config.text_config.vocab_size, (1, sum(CHUNKS)))
    out, start = [], 0
    for size in CHUNKS:
        out.append(np.array(model(mx.array(ids[:, start:start + size]), cache)))
        start += size
    for token in (5, 9, 5, 17):
        out.append(np.array(model(mx.array([[token]]), cache)))
    return np.concatenate(out, axis=1)


def with_global_caches(cache: list, make) -> list:
    return [make() if isinstance(c, QuantizedKVCache) else c for c in cache]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gpu_route", [False, True])
def test_quantized_cache_attends_as_its_dequantized_keys_and_values(model, bits, gpu_route, monkeypatch):
    """Prefill chunks (causal over quantized keys), decode, KV-shared layers and K=V layers reading packed
    keys and values give the logits of float attention over the same values dequantized."""
    if gpu_route:  # no CPU streams: one attention call over all heads
        monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    cache = model.make_cache(kv_bits=bits, kv_group_size=GROUP)
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    got = run(model, cache)
    expected = run(model, with_global_caches(model.make_cache(kv_bits=bits, kv_group_size=GROUP),
                                             lambda: DequantizedKVCache(bits)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_an_8_bit_cache_stays_near_the_float_cache(model):
    got = run(model, model.make_cache(kv_bits=8, kv_group_size=GROUP))
    expected = run(model, model.make_cache())
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_global_caches_are_quantized_and_they_shrink(model, bits):
    text = model.config.text_config
    quantized, plain = model.make_cache(kv_bits=bits, kv_group_size=GROUP), model.make_cache()
    run(model, quantized), run(model, plain)
    for layer, (q, f) in enumerate(zip(quantized, plain)):
        if text.is_sliding(layer):
            assert isinstance(q, RotatingKVCache) and q.nbytes == f.nbytes
            continue
        heads, positions, width = text.layer_kv_heads(layer), q.offset, text.layer_head_dim(layer)
        assert [a.shape for a in q.state[0]] == [(1, heads, positions, width * bits // 32),
                                                 (1, heads, positions, width // GROUP),
                                                 (1, heads, positions, width // GROUP)]
        # Packed values plus a float32 scale and bias per group, in buffers grown as the float ones are.
        assert q.nbytes / f.nbytes == pytest.approx((width * bits / 8 + 2 * 4 * width / GROUP) / (4 * width))


@pytest.mark.parametrize("options,message", [
    ({"kv_bits": 7}, "bits in (2, 3, 4, 5, 6, 8)"),
    ({"kv_bits": 4, "kv_group_size": 48}, "a group size in (32, 64, 128)"),
    ({"kv_bits": 4, "max_kv_size": 64}, "use one of them"),
    ({"kv_bits": 4, "kv_group_size": 64}, "a KV group size of 64 does not divide the global layers' head dim 32"),
])
def test_bad_kv_options_are_clear_errors(model, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.make_cache(**options)
