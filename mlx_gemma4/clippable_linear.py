"""A bias-free linear layer whose input and output are clamped to learned bounds.

The Gemma 4 encoders (the E2B/E4B vision tower and the audio tower) store four
scalar bounds per projection (`input_min`, `input_max`, `output_min`,
`output_max`) next to the weight, which sits one level down under `linear.`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ClippableLinear(nn.Module):
    """`clip(W · clip(x, input_min, input_max), output_min, output_max)`; without
    `clipped` it is a plain linear layer under the same `linear.weight` name."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.input_min = mx.array(-mx.inf)
            self.input_max = mx.array(mx.inf)
            self.output_min = mx.array(-mx.inf)
            self.output_max = mx.array(mx.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        # Bounds are cast to the activation dtype so they never promote it.
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))
