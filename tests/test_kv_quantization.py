"""Quantized caches of the global layers (`kv_bits`): attention over the packed keys and values."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import precision
from mlx_gemma4.attention import QuantizedTensor
from mlx_gemma4.cache import KVCache, QuantizedKVCache, RotatingKVCache
from mlx_gemma4.loader import load_model
from tiny_checkpoints import VARIANTS

GROUP = 32  # the tiny models' global head dim
CHUNKS = (7, 40, 13)  # 40 queries x 47 keys: the heads are split over the CPU streams


class DequantizedKVCache(KVCache):
    """A float cache holding what a quantized one holds, dequantized: the reference for its attention.
    Floats as they come until an update would take it past `start`; from that update on, the keys and
    values held and every later one rounded through quantization."""

    def __init__(self, bits: int, start: int = 0):
        super().__init__()
        self.bits, self.start, self.rounding = bits, start, False

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if not self.rounding and self.offset + keys.shape[2] > self.start:
            self.rounding = True
            if self.keys is not None:
                self.keys, self.values = self._stored(self.keys), self._stored(self.values)
        return super().update_and_fetch(keys, values)

    def _stored(self, x: mx.array) -> mx.array:
        if not self.rounding:
            return x
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


def quantized(bits: int, start: int = 0) -> dict:
    return {"kv_bits": bits, "kv_group_size": GROUP, "quantized_kv_start": start}


def with_global_caches(cache: list, make) -> list:
    return [make() if isinstance(c, QuantizedKVCache) else c for c in cache]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gpu_route", [False, True])
def test_quantized_cache_attends_as_its_dequantized_keys_and_values(model, bits, gpu_route, monkeypatch):
    """Prefill chunks (causal over quantized keys), decode, KV-shared layers and K=V layers reading packed
    keys and values give the logits of float attention over the same values dequantized."""
    if gpu_route:  # no CPU streams: one attention call over all heads
        monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    cache = model.make_cache(**quantized(bits))
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    got = run(model, cache)
    expected = run(model, with_global_caches(model.make_cache(**quantized(bits)),
                                             lambda: DequantizedKVCache(bits)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("start,float_calls", [(7, 1), (60, 3), (61, 4), (None, 7)])
def test_the_cache_is_quantized_from_the_update_that_passes_quantized_kv_start(model, start, float_calls):
    """The calls that leave at most `start` tokens cached attend float keys and values, as a float cache does
    (`run` makes 7 calls: chunks of 7, 40 and 13 tokens, then 4 one-token steps). The call that would take the
    cache past `start` quantizes what it holds, and from it on the logits are those of attention over the
    dequantized keys and values. By default (start 5 000, as mlx-lm) this short context is never quantized."""
    options = quantized(4, start) if start is not None else {"kv_bits": 4, "kv_group_size": GROUP}
    float_columns = sum((*CHUNKS, 1, 1, 1, 1)[:float_calls])
    cache = model.make_cache(**options)
    got = run(model, cache)
    plain = run(model, model.make_cache())
    np.testing.assert_array_equal(got[:, :float_columns], plain[:, :float_columns])
    expected = run(model, with_global_caches(model.make_cache(**options),
                                             lambda: DequantizedKVCache(4, 5000 if start is None else start)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    global_caches = [c for c in cache if isinstance(c, QuantizedKVCache)]
    assert global_caches and all(isinstance(c.state[0], QuantizedTensor) == (float_calls < 7) for c in global_caches)
    if float_calls < 7:  # and quantizing changed something
        assert np.abs(got[:, float_columns:] - plain[:, float_columns:]).max() > 1e-3 * np.abs(plain).max()


def test_an_8_bit_cache_stays_near_the_float_cache(model):
    got = run(model, model.make_cache(**quantized(8)))
    expected = run(model, model.make_cache())
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_global_caches_are_quantized_and_they_shrink(model, bits):
    text = model.config.text_config
    packed, plain = model.make_cache(**quantized(bits)), model.make_cache()
    run(model, packed), run(model, plain)
    for layer, (q, f) in enumerate(zip(packed, plain)):
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
    ({"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": -1}, "quantized_kv_start must be 0 or more"),
])
def test_bad_kv_options_are_clear_errors(model, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.make_cache(**options)


def test_quantized_attention_reads_the_packed_cache_without_copies():
    """The query heads that share a key/value head are stacked as rows, so the packed keys and values are not
    broadcast over them (MLX's CPU kernel would copy a broadcast cache once per query head of the group)."""
    from mlx_gemma4.attention import quantized_attention

    heads, kv_heads, keys, width = 8, 1, 4096, 128
    k, v = (QuantizedTensor(*mx.quantize(mx.random.normal((1, kv_heads, keys, width), key=mx.random.key(i)), GROUP, 8))
            for i in (1, 2))
    q = mx.random.normal((1, heads, 1, width), key=mx.random.key(3))
    mx.eval(k, v, q)
    cache_bytes = sum(a.nbytes for t in (k, v) for a in t)
    mx.reset_peak_memory()
    held = mx.get_active_memory()
    out = quantized_attention(q, k, v, None)
    mx.eval(out)
    assert mx.get_peak_memory() - held < cache_bytes / 2
    # The same values as attention over the dequantized cache.
    k_float, v_float = (mx.dequantize(*t, group_size=GROUP, bits=8) for t in (k, v))
    expected = mx.fast.scaled_dot_product_attention(q, k_float, v_float, scale=1.0)
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=0, atol=1e-5)
