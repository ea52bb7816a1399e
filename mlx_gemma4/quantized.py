"""Quantized linear layers whose many-row products dequantize first on the CPU.

MLX's CPU `quantized_matmul` handles a batch of rows as that many one-row
products, so a prefill chunk gets no reuse of the weights it unpacks. For a
chunk of at least `DEQUANTIZE_MIN_ROWS` rows it is faster to dequantize the
matrix once and run one matrix product: measured on a 2-core x86 CPU (4-bit,
group 64, float32 activations, 512 rows), 1.2-1.3x faster with the reference
BLAS the `mlx[cpu]` wheel bundles, and about 20x faster when MLX's `cblas_sgemm`
is an optimised BLAS (see benchmarks/RESULTS.md). Below ~64 rows the unpacking
costs more than it saves. On a GPU, `quantized_matmul` has real many-row
kernels and is always used.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import precision

DEQUANTIZE_MIN_ROWS = 64
# Dequantize at most this many weights at once (4 MB in float32; MLX's CPU
# dequantize holds a few temporaries of that size). Measured on E2B (10 layers,
# 128-token chunk): the prefill peak above the weights is 48 MB with 1 M-weight
# blocks against 39 MB for packed products, 136 MB with 4 M and 283 MB with 16 M,
# at the same speed.
DEQUANTIZE_MAX_WEIGHTS = 1 << 20


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` with the CPU many-row path described above."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < DEQUANTIZE_MIN_ROWS or not precision.cpu_backend():
            return super().__call__(x)
        weight, scales, biases = self["weight"], self["scales"], self.get("biases")
        in_features = x.shape[-1]
        step = max(1, DEQUANTIZE_MAX_WEIGHTS // in_features)
        parts = []
        for start in range(0, weight.shape[0], step):
            block = slice(start, start + step)
            # Unpack a block only once the previous product (or the input) exists:
            # otherwise the scheduler may unpack many blocks and layers up front,
            # holding all their float32 copies at once.
            packed = mx.depends(weight[block], parts[-1] if parts else x)
            w = mx.dequantize(packed, scales[block], None if biases is None else biases[block],
                              group_size=self.group_size, bits=self.bits, mode=self.mode, dtype=x.dtype)
            parts.append(x @ w.T)
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return y + self["bias"] if "bias" in self else y


def use_dequantizing_prefill(model: nn.Module) -> None:
    """Give every quantized linear layer of `model` the CPU many-row path
    (the class only adds a branch to `__call__`; parameters are untouched)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
