"""Elementwise chains fused into one kernel each with `mx.compile`.

Each op of an eager chain is one kernel launch on Metal; compiled, a chain of
elementwise ops is one. `shapeless=True` keeps one trace for every sequence
length (none of these reshape). MLX fuses a chain only up to a small depth:
`nn.gelu_approx` alone compiles to two kernels and the product with the up
projection adds a third; `geglu` is one.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Tuple

import mlx.core as mx

# 0.5 * (1 + tanh(z)) == sigmoid(2z): the same tanh-approximate GELU as
# `nn.gelu_approx` in a chain short enough to compile into one kernel.
_K1 = 2 * math.sqrt(2 / math.pi)
_K3 = _K1 * 0.044715


def _gelu_over_gate(gate: mx.array) -> mx.array:
    """`gelu_tanh(gate) / gate`, traced into the compiled kernels below."""
    return mx.sigmoid(gate * (_K3 * mx.square(gate) + _K1))


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """`gelu_tanh(gate) * up` (the tanh approximation, as `nn.gelu_approx`)."""
    return (gate * up) * _gelu_over_gate(gate)


@partial(mx.compile, shapeless=True)
def weighted_geglu(gate: mx.array, up: mx.array, weight: mx.array, scale: mx.array) -> mx.array:
    """`geglu(gate, up)` times `weight * scale` (cast to the gate's dtype): an
    expert's routing weight and scale, applied before its down projection (which
    is linear). The weight joins `up` first: a chain one op longer from the
    `square` would pass MLX's fusion depth and split into two kernels."""
    weighted_up = up * (weight * scale).astype(gate.dtype)
    return (gate * weighted_up) * _gelu_over_gate(gate)


@partial(mx.compile, shapeless=True)
def add_and_widen(h: mx.array, x: mx.array) -> Tuple[mx.array, mx.array]:
    """`h + x`, and the sum again in float32 (for a norm that runs in float32)."""
    total = h + x
    return total, total.astype(mx.float32)


@partial(mx.compile, shapeless=True)
def weigh_normed(normed: mx.array, weights: mx.array) -> mx.array:
    """`normed` [..., H] times each of `weights` [k, 1, ..., H], in the weights'
    dtype: `[k, ..., H]`, the outputs of k RMS norms of one input from one
    weightless norm (one array, so one kernel: MLX fuses no sibling outputs)."""
    return normed.astype(weights.dtype) * weights


@partial(mx.compile, shapeless=True)
def add_scale(h: mx.array, x: mx.array, scale: mx.array) -> mx.array:
    """`(h + x) * scale`: the last residual add and the layer scalar."""
    return (h + x) * scale


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: mx.array) -> mx.array:
    """`tanh(x / cap) * cap`."""
    return mx.tanh(x / cap) * cap


@partial(mx.compile, shapeless=True)
def mix(x: mx.array, y: mx.array, y_scale: mx.array, scale: mx.array) -> mx.array:
    """`(x + y * y_scale) * scale`: PLE's sum of its context and token parts."""
    return (x + y * y_scale) * scale
