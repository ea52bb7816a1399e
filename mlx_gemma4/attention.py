"""Gemma 4 self-attention: sliding and global layers, p-RoPE, K=V and KV sharing."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from . import precision, streams
from .config import TextConfig


class QuantizedTensor(NamedTuple):
    """Keys or values `[B, heads, positions, head_dim]` as `mx.quantize` packs
    them (affine, groups along head_dim); see `cache.QuantizedKVCache`."""

    packed: mx.array
    scales: mx.array
    biases: mx.array

    def quantization(self, head_dim: int) -> dict:
        """The `group_size` and `bits` these arrays were packed with."""
        return {"group_size": head_dim // self.scales.shape[-1], "bits": self.packed.shape[-1] * 32 // head_dim}

    def heads(self, parts: int) -> list:
        """`parts` equal groups of heads, each a QuantizedTensor."""
        return [QuantizedTensor(*group) for group in zip(*(mx.split(a, parts, axis=1) for a in self))]


Keys = Union[mx.array, QuantizedTensor]
KV = Tuple[Keys, Keys]
Mask = Union[None, str, mx.array]
# Attention with fewer query-key pairs per head gains less from another thread
# than the hand-over costs (one decode query over fewer than 1024 keys).
SPLIT_ATTENTION_MIN_SCORES = 1024


def rope_periods(head_dim: int, theta: float, partial_rotary_factor: float) -> Optional[mx.array]:
    """Per-pair rotation periods for `mx.fast.rope`, or None for plain RoPE.

    Proportional RoPE keeps the exponent denominator at the full head_dim and
    rotates only the first `factor * head_dim / 2` pairs; the rest get an infinite
    period (angle 0), so they pass through. Pairs are (j, j + head_dim/2).
    """
    if partial_rotary_factor >= 1.0:
        return None
    rotated_pairs = int(partial_rotary_factor * head_dim / 2)
    exponents = mx.arange(0, 2 * rotated_pairs, 2, dtype=mx.float32) / head_dim
    periods = theta**exponents
    still = mx.full((head_dim // 2 - rotated_pairs,), mx.inf, dtype=mx.float32)
    return mx.concatenate([periods, still])


def inverse_frequencies(head_dim: int, theta: float, periods: Optional[mx.array]) -> mx.array:
    """The angle per position of each rotated pair, as `mx.fast.rope` computes
    it (from `base`, or the reciprocal of `freqs`)."""
    if periods is not None:
        return mx.reciprocal(periods)
    half = head_dim // 2
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(math.log(theta) / half, dtype=mx.float32))


@partial(mx.compile, shapeless=True)
def _scale_and_rotate(first: mx.array, second: mx.array, inverse_rms: mx.array, weight_first: mx.array,
                      weight_second: mx.array, cos: mx.array, sin: mx.array) -> Tuple[mx.array, mx.array]:
    a = first * inverse_rms * weight_first
    b = second * inverse_rms * weight_second
    return (a * cos - b * sin).astype(first.dtype), (b * cos + a * sin).astype(first.dtype)


def cpu_norm_and_rotate(y: mx.array, weight: mx.array, rotated: int, plain_from: int, inverse_freqs: mx.array,
                        offset: int, eps: float) -> Tuple[mx.array, mx.array]:
    """The CPU route of norming heads `y` `[B, T, heads, head_dim]` (RMS, no
    weight), scaling the first `rotated` by `weight` (`[rotated, head_dim]` or
    `[head_dim]`) and rotating them (RoPE at positions `offset`, `offset + 1`,
    ...). Returns those heads and the normed heads from `plain_from` on, each
    `[B, heads, T, head_dim]`.

    MLX's CPU backend runs `mx.fast.rms_norm` and `mx.fast.rope` as chains of
    primitives whose temporaries, allocated ahead of the compute, are alive at
    once: about 2 copies of every head and 5 of the rotated ones. Here the sum
    of squares is a product (no squared copy) and the scale and rotation are one
    compiled kernel: the same float operations in the same order, bit-identical
    results (tested). Measured on a 127-token prefill chunk of a 31B layer, the
    Q|K|V projection, norms and rotation peak 38 / 48 MB (sliding / global) above
    their input, against 58 / 75 MB with `mx.fast` (the projection alone: 20 /
    22 MB). Whole 128-token prefills peak 64 MB (31B, 2 layers) and 16 MB (E2B,
    10 layers) above the weights, against 88 and 23 MB; the same speed.
    """
    heads = y.transpose(0, 2, 1, 3)
    # In float32 whatever the compute dtype, as MLX's norm does; the sum of
    # squares as a product, which makes no squared copy of the heads.
    squares = mx.einsum("bhtd,bhtd->bht", *[heads.astype(mx.float32)] * 2)[..., None]
    inverse_rms = mx.rsqrt(squares / y.shape[-1] + eps)
    half = y.shape[-1] // 2
    positions = mx.arange(offset, offset + y.shape[1], dtype=mx.float32)
    angles = positions[:, None] * inverse_freqs
    weight = weight[:, None, :] if weight.ndim == 2 else weight
    first, second = _scale_and_rotate(heads[:, :rotated, :, :half], heads[:, :rotated, :, half:],
                                      inverse_rms[:, :rotated], weight[..., :half], weight[..., half:],
                                      mx.cos(angles), mx.sin(angles))
    plain = (heads[:, plain_from:] * inverse_rms[:, plain_from:]).astype(y.dtype)
    return mx.concatenate([first, second], axis=-1), plain


def quantized_attention(q: mx.array, k: QuantizedTensor, v: QuantizedTensor, mask: Mask,
                        stream: Optional[mx.Stream] = None) -> mx.array:
    """Attention with scale 1 over quantized keys and values: the scores and
    the weighted sum are quantized products, so the cache is never dequantized
    whole. `mx.fast.scaled_dot_product_attention` takes only float keys."""
    B, heads, T, D = q.shape
    kv_heads, keys = k.packed.shape[1], k.packed.shape[2]
    group, quantization = heads // kv_heads, k.quantization(D)
    # The query rows of the `group` heads a key/value head serves are stacked, [B, kv_heads, group * T, D], so
    # the packed keys and values are read as they are: a broadcast over a group axis, which MLX's CPU kernel
    # makes contiguous first, would copy them `group` times.
    q = q.reshape(B, kv_heads, group * T, D)
    scores = mx.quantized_matmul(q, *k, transpose=True, **quantization, stream=stream)
    if isinstance(mask, str):  # "causal", aligned to the last key
        mask = mx.arange(keys - T, keys)[:, None] >= mx.arange(keys)[None]
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask  # [B, 1, T, S]: one mask for every head
        scores = scores.reshape(B, kv_heads, group, T, keys)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min, stream=stream).reshape(B, kv_heads, -1, keys)
    weights = mx.softmax(scores, axis=-1, precise=True, stream=stream)
    out = mx.quantized_matmul(weights, *v, transpose=False, **quantization, stream=stream)
    return out.reshape(B, heads, T, D)


def _attention(q: mx.array, k: Keys, v: Keys, mask: Mask, stream: Optional[mx.Stream] = None) -> mx.array:
    if isinstance(k, QuantizedTensor):
        return quantized_attention(q, k, v, mask, stream)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask, stream=stream)


def attend(q: mx.array, k: Keys, v: Keys, mask: Mask) -> mx.array:
    """Scaled dot-product attention with scale 1 (q_norm/k_norm replace the
    1/sqrt(head_dim) scaling), over float or quantized keys and values. On the
    CPU backend, where MLX's attention runs on one thread, the heads of a large
    enough call are split over the CPU streams (see `streams`): decode over a
    long cache, prefill chunks, image patches. Measured (2 cores, 10-layer E2B
    / 4-layer 26B-A4B, 4-bit), decode with 8K tokens cached runs at 0.93x /
    0.91x of a short-context decode, 0.87x / 0.86x with single-threaded attention."""
    large = q.shape[2] * kv_shape(k)[2] >= SPLIT_ATTENTION_MIN_SCORES
    # Our masks are shared by all heads (None, "causal", [T, S], [B, 1, T, S]); a per-head one is not split.
    per_head_mask = isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] > 1
    # The backend first: a GPU never makes the CPU streams.
    lanes = streams.cpu_streams()[:q.shape[1]] if large and not per_head_mask and precision.cpu_backend() else (None,)
    parts, kv_heads = len(lanes), kv_shape(k)[1]
    if parts == 1 or (kv_heads > 1 and kv_heads % parts):
        return _attention(q, k, v, mask)
    # Contiguous groups of query heads with the key/value heads they read.
    q_parts = mx.split(q, streams.split_points(q.shape[1], parts), axis=1)
    kv_parts = [(k, v)] * parts if kv_heads == 1 else zip(*(_head_groups(t, parts) for t in (k, v)))
    return streams.join([
        _attention(part_q, part_k, part_v, mask, stream)
        for part_q, (part_k, part_v), stream in zip(q_parts, kv_parts, lanes)
    ], axis=1)


def kv_shape(x: Keys) -> Tuple[int, int, int]:
    """`(B, heads, positions)` of keys or values, float or packed."""
    return (x.packed if isinstance(x, QuantizedTensor) else x).shape[:3]


def _head_groups(x: Keys, parts: int) -> list:
    return x.heads(parts) if isinstance(x, QuantizedTensor) else mx.split(x, parts, axis=1)


class Attention(nn.Module):
    """One attention layer. A KV-shared layer has no K/V weights: it reads the
    keys and values of its `kv_source_layer` (passed in as `shared_kv`)."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = config.layer_head_dim(layer)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.layer_kv_heads(layer)
        self.eps = config.rms_norm_eps
        self.owns_kv = config.kv_source_layer(layer) == layer
        bias = config.attention_bias

        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        if self.owns_kv:
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            # K=V: global layers take V from the raw k_proj output.
            if not (config.attention_k_eq_v and not config.is_sliding(layer)):
                self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

        rope = config.rope(layer)
        self.rope_theta = rope.theta
        self._rope_periods = rope_periods(self.head_dim, rope.theta, rope.partial_rotary_factor)
        self._inverse_freqs = inverse_frequencies(self.head_dim, rope.theta, self._rope_periods)
        # Set at load time by `fusion.fuse`; None (trainable models): built per call.
        self._stacked_norm_weight: Optional[mx.array] = None

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        if self._rope_periods is None:
            return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta,
                                scale=1.0, offset=offset)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._rope_periods)

    def stacked_norm_weight(self) -> mx.array:
        """`[n_heads + n_kv_heads, head_dim]`: q_norm's weight for every query
        head, then k_norm's for every key head (fusion.fuse stores it)."""
        shape = (self.n_heads, self.head_dim), (self.n_kv_heads, self.head_dim)
        return mx.concatenate([mx.broadcast_to(self.q_norm.weight, shape[0]),
                               mx.broadcast_to(self.k_norm.weight, shape[1])])

    def _queries_keys_values(self, x: mx.array, offset: int) -> tuple:
        """Normed, rotated Q, K and V as `[B, heads, T, head_dim]`.

        Q|K|V heads come from one matmul (fused at load time, else concatenated)
        and are normed together: one weightless rms_norm over every head (V's
        norm has no weight), one multiply by the stacked q/k norm weights and one
        rope over the Q|K heads, where separate norms and ropes take five kernels.
        """
        B, T, _ = x.shape
        if "qkv_proj" in self:
            y = self.qkv_proj(x)
        else:
            y = mx.concatenate([self[n](x) for n in ("q_proj", "k_proj", "v_proj") if n in self], axis=-1)
        y = y.reshape(B, T, -1, self.head_dim)
        qk_heads = self.n_heads + self.n_kv_heads
        weight = self.stacked_norm_weight() if self._stacked_norm_weight is None else self._stacked_norm_weight
        # K=V: no V heads, V is the un-weighted norm of the K heads.
        v_from = self.n_heads if y.shape[2] == qk_heads else qk_heads
        if precision.cpu_backend():
            qk, v = cpu_norm_and_rotate(y, weight, qk_heads, v_from, self._inverse_freqs, offset, self.eps)
        else:
            y = mx.fast.rms_norm(y, None, self.eps)
            qk = self._rope((y[:, :, :qk_heads] * weight).transpose(0, 2, 1, 3), offset)
            v = y[:, :, v_from:].transpose(0, 2, 1, 3)
        return qk[:, : self.n_heads], qk[:, self.n_heads:], v

    def __call__(
        self,
        x: mx.array,
        mask: Mask,
        offset: int,
        cache=None,
        shared_kv: Optional[KV] = None,
    ) -> Tuple[mx.array, KV]:
        """Returns the layer output and the (keys, values) it attended over."""
        B, T, _ = x.shape
        if self.owns_kv:
            q, k, v = self._queries_keys_values(x, offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        else:
            q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
            if precision.cpu_backend():
                q, _ = cpu_norm_and_rotate(q, self.q_norm.weight, self.n_heads, self.n_heads, self._inverse_freqs,
                                           offset, self.eps)
            else:
                q = self._rope(self.q_norm(q).transpose(0, 2, 1, 3), offset)
            k, v = shared_kv

        out = attend(q, k, v, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out), (k, v)
