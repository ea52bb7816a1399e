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


def inverse_frequencies(head_dim: int, theta: float, partial_rotary_factor: float) -> mx.array:
    """The angle per position of each rotated pair (j, j + head_dim/2), computed
    as `mx.fast.rope` does from its `base` (or, for p-RoPE, its `freqs`).

    Proportional RoPE keeps the exponent denominator at the full head_dim and
    rotates only the first `factor * head_dim / 2` pairs; the rest get angle 0,
    so they pass through.
    """
    half = head_dim // 2
    if partial_rotary_factor >= 1.0:
        return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(math.log(theta) / half, dtype=mx.float32))
    rotated_pairs = int(partial_rotary_factor * head_dim / 2)
    periods = theta ** (mx.arange(0, 2 * rotated_pairs, 2, dtype=mx.float32) / head_dim)
    return mx.concatenate([mx.reciprocal(periods), mx.zeros((half - rotated_pairs,), dtype=mx.float32)])


@partial(mx.compile, shapeless=True)
def _scale_and_rotate(heads: mx.array, partners: mx.array, scale: mx.array, weight: mx.array,
                      partner_weight: mx.array, positions: mx.array, inverse_freqs: mx.array,
                      sign: mx.array) -> mx.array:
    # Heads as [..., 2, head_dim / 2]: element (0, j) rotates with its partner
    # (1, j), which `partners` (the same heads, halves swapped, a view) holds,
    # so the rotation is elementwise and its output comes out whole. `sign` is
    # -1 on the first half: a * cos - b * sin and b * cos + a * sin, the float
    # operations of `mx.fast.rope` in its order (bit-identical, tested).
    angles = positions * inverse_freqs
    return (heads * scale * weight * mx.cos(angles)
            + partners * scale * partner_weight * (mx.sin(angles) * sign)).astype(heads.dtype)


_ROTATION_SIGN = mx.array([[-1.0], [1.0]])
_ONE = mx.array(1.0)


def norm_and_rotate(y: mx.array, weight: mx.array, rotated: int, plain_from: int, inverse_freqs: mx.array,
                    offset: int, eps: float) -> Tuple[mx.array, mx.array]:
    """Norm heads `y` `[B, T, heads, head_dim]` (RMS, no weight), scale the
    first `rotated` by `weight` (`[rotated, head_dim]` or `[head_dim]`) and
    rotate them (RoPE at positions `offset`, `offset + 1`, ...). Returns those
    heads and the normed heads from `plain_from` on, each `[B, heads, T, head_dim]`.

    The weight and the rotation (with its angles) are one compiled kernel,
    where a multiply and `mx.fast.rope` take two. On a GPU the norm is
    `mx.fast.rms_norm`. MLX's CPU backend runs that as a chain of primitives
    whose temporaries, allocated ahead of the compute, are alive at once (about
    2 copies of every head): there the sum of squares is a product (no squared
    copy) and the norm's scale goes into the compiled kernel, the same float
    operations in the same order. Measured, 128-token prefills peak 50 MB (31B,
    2 layers) and 13-14 MB (E2B, 10 layers) above the weights, against 88 and
    23 MB with `mx.fast`'s CPU fallbacks, and 61 and 15-16 MB when the rotated
    halves came out apart and were concatenated; the same speed.
    """
    B, T, heads, head_dim = y.shape
    if precision.cpu_backend():
        # In float32 whatever the compute dtype, as MLX's norm does.
        squares = mx.einsum("bthd,bthd->bth", *[y.astype(mx.float32)] * 2)[..., None]
        inverse_rms = mx.rsqrt(squares / head_dim + eps)
        plain = (y[:, :, plain_from:] * inverse_rms[:, :, plain_from:]).astype(y.dtype)
        scale = inverse_rms[:, :, :rotated, :, None]
    else:
        y = mx.fast.rms_norm(y, None, eps)
        plain, scale = y[:, :, plain_from:], _ONE
    halves = y.reshape(B, T, heads, 2, head_dim // 2)[:, :, :rotated]  # views, no copy
    weight = weight.reshape(*weight.shape[:-1], 2, head_dim // 2)
    positions = mx.array(list(range(offset, offset + T)), dtype=mx.float32).reshape(T, 1, 1, 1)
    out = _scale_and_rotate(halves, halves[..., ::-1, :], scale, weight, weight[..., ::-1, :], positions,
                            inverse_freqs, _ROTATION_SIGN)
    return out.reshape(B, T, rotated, head_dim).transpose(0, 2, 1, 3), plain.transpose(0, 2, 1, 3)


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
        self._inverse_freqs = inverse_frequencies(self.head_dim, rope.theta, rope.partial_rotary_factor)
        # Set at load time by `fusion.fuse`; None (trainable models): built per call.
        self._stacked_norm_weight: Optional[mx.array] = None

    def stacked_norm_weight(self) -> mx.array:
        """`[n_heads + n_kv_heads, head_dim]`: q_norm's weight for every query
        head, then k_norm's for every key head (fusion.fuse stores it)."""
        if self._stacked_norm_weight is not None:
            return self._stacked_norm_weight
        shape = (self.n_heads, self.head_dim), (self.n_kv_heads, self.head_dim)
        return mx.concatenate([mx.broadcast_to(self.q_norm.weight, shape[0]),
                               mx.broadcast_to(self.k_norm.weight, shape[1])])

    def _queries_keys_values(self, x: mx.array, offset: int) -> tuple:
        """Normed, rotated Q, K and V as `[B, heads, T, head_dim]`.

        Q|K|V heads come from one matmul (fused at load time, else concatenated)
        and are normed together (V's norm has no weight): one weightless norm over
        every head, then one kernel scales the Q|K heads by the stacked q/k norm
        weights and rotates them, where separate norms and ropes take five.
        """
        B, T, _ = x.shape
        if "qkv_proj" in self:
            y = self.qkv_proj(x)
        else:
            y = mx.concatenate([self[n](x) for n in ("q_proj", "k_proj", "v_proj") if n in self], axis=-1)
        y = y.reshape(B, T, -1, self.head_dim)
        qk_heads = self.n_heads + self.n_kv_heads
        weight = self.stacked_norm_weight()
        # K=V: no V heads, V is the un-weighted norm of the K heads.
        v_from = self.n_heads if y.shape[2] == qk_heads else qk_heads
        qk, v = norm_and_rotate(y, weight, qk_heads, v_from, self._inverse_freqs, offset, self.eps)
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
            q, _ = norm_and_rotate(q, self.q_norm.weight, self.n_heads, self.n_heads, self._inverse_freqs, offset,
                                   self.eps)
            k, v = shared_kv

        out = attend(q, k, v, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out), (k, v)
