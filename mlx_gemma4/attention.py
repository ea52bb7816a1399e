"""Gemma 4 self-attention: sliding and global layers, p-RoPE, K=V and KV sharing."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig

KV = Tuple[mx.array, mx.array]
Mask = Union[None, str, mx.array]


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

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        if self._rope_periods is None:
            return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta,
                                scale=1.0, offset=offset)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._rope_periods)

    def _project(self, x: mx.array) -> tuple:
        """Q, K and V (None when V is K; K and V None on a KV-shared layer), from
        one fused matmul once `fusion.fuse` has run."""
        if "qkv_proj" not in self:
            k = self.k_proj(x) if self.owns_kv else None
            return self.q_proj(x), k, self.v_proj(x) if "v_proj" in self else None
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        y = self.qkv_proj(x)
        if y.shape[-1] == q_width + kv_width:  # K=V: no V rows
            q, k = mx.split(y, [q_width], axis=-1)
            return q, k, None
        return tuple(mx.split(y, [q_width, q_width + kv_width], axis=-1))

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
        q, k, v = self._project(x)
        q = self.q_norm(q.reshape(B, T, self.n_heads, self.head_dim))
        q = self._rope(q.transpose(0, 2, 1, 3), offset)

        if self.owns_kv:
            k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
            v = k if v is None else v.reshape(k.shape)
            k = self._rope(self.k_norm(k).transpose(0, 2, 1, 3), offset)
            v = mx.fast.rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        else:
            k, v = shared_kv

        # q_norm/k_norm replace the 1/sqrt(head_dim) scaling.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out), (k, v)
