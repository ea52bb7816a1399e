"""The GeGLU feed-forward block of the Gemma 4 decoder."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import precision, quantized
from .kernels import geglu


class MLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:  # fused at load time (see `fusion`)
            if precision.cpu_backend():
                streamed = quantized.cpu_gated_mlp(x, self.gate_up_proj, self.down_proj, geglu)
                if streamed is not None:
                    return streamed
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(geglu(gate, up))
