"""Quantized products on the CPU backend: spread over the cores, and
dequantized first for many rows.

MLX's CPU `quantized_matmul` and its bundled reference BLAS each run on one
thread, but every CPU stream has its own thread: a product split by output
rows over one stream per core runs the parts at once (2 cores: 1.9x faster
for one decode row, 1.3-1.6x for a 128-row prefill chunk; measured in
benchmarks/RESULTS.md).

MLX's CPU `quantized_matmul` also handles a batch of rows as that many one-row
products, so a prefill chunk gets no reuse of the weights it unpacks. For a
chunk of at least `DEQUANTIZE_MIN_ROWS` rows it is faster to dequantize the
matrix block by block and run matrix products: 1.2-1.3x faster with the
reference BLAS, and about 20x faster when MLX's `cblas_sgemm` is an optimised
BLAS. Below ~64 rows the unpacking costs more than it saves.

On a GPU, `quantized_matmul` has real many-row kernels and is always used.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import precision

DEQUANTIZE_MIN_ROWS = 64
# Dequantize at most this many weights at once (2 MB in float32; MLX's CPU
# dequantize holds a few temporaries of that size, and each stream has a block
# in flight). Measured on E2B (10 layers, 127-token chunk, 2 streams): the
# prefill peak above the weights is 55 MB with 1 M-weight blocks, 38 MB with
# 512 K and 34 MB with 256 K, at the same speed (39 MB for packed products).
DEQUANTIZE_MAX_WEIGHTS = 1 << 19
# Bounds on the weights of one part of a packed product. Below the lower one
# another thread gains less than the hand-over costs (measured: a 128x1536
# 4-bit matrix is slower split in two, a 256x1536 one 1.4x faster). The upper
# one bounds what a part casts: MLX casts bfloat16 scales and biases to the
# activations' float32 per call (2 MB per 16 M weights). Measured on E2B (10
# layers, 32-token prompt; mlx-vlm 0.90 GB): peak 0.91 / 0.93 / 0.96 GB with
# 4 M / 16 M / 64 M, decode 2.0 / 2.1-2.3 / 2.4 tok/s (runs vary by ~10 %).
MIN_WEIGHTS_PER_PART = 1 << 17
MAX_WEIGHTS_PER_PART = 1 << 24
# Each stream has a dequantized block (or a cast part) in flight: the cap bounds
# that memory on many-core machines (only 2 cores were measured).
MAX_CPU_STREAMS = 8


@lru_cache(maxsize=1)
def cpu_streams() -> Tuple[Optional[mx.Stream], ...]:
    """One CPU stream per core this process may use, at most `MAX_CPU_STREAMS`
    (None: the default stream)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (None,) + tuple(mx.new_stream(mx.cpu) for _ in range(min(cores, MAX_CPU_STREAMS) - 1))


def split_points(size: int, parts: int) -> List[int]:
    """Indices that cut `size` rows into `parts` runs of near-equal length (for `mx.split`)."""
    return [size * part // parts for part in range(1, parts)]


def join(parts: List[mx.array], axis: int) -> mx.array:
    """The per-stream results put back together (a lone part is not copied)."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def cpu_quantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: Optional[mx.array],
                         group_size: int, bits: int, mode: str) -> mx.array:
    """`x @ dequantize(weight).T` in blocks of output columns, the blocks dealt
    round the CPU streams."""
    rows, in_features, out_features = x.size // x.shape[-1], x.shape[-1], weight.shape[0]
    streams = cpu_streams()
    dequantize = rows >= DEQUANTIZE_MIN_ROWS
    if dequantize:
        step = DEQUANTIZE_MAX_WEIGHTS // in_features
    else:
        per_stream = -(-out_features // len(streams))
        step = min(max(per_stream, MIN_WEIGHTS_PER_PART // in_features), MAX_WEIGHTS_PER_PART // in_features)
    step = max(step, 1)
    parts, previous = [], {}
    for i, start in enumerate(range(0, out_features, step)):
        lane = i % len(streams)
        block = slice(start, start + step)
        inputs = [weight[block], scales[block]] + ([] if biases is None else [biases[block]])
        # A block is unpacked (or its scales cast) only once this stream's previous
        # product, or the input, exists: otherwise the scheduler may do it for many
        # blocks and layers up front, holding all their float32 copies at once.
        packed, block_scales, *block_biases = mx.depends(inputs, [previous.get(lane, x)])
        block_biases = block_biases[0] if block_biases else None
        if dequantize:
            w = mx.dequantize(packed, block_scales, block_biases, group_size=group_size, bits=bits,
                              mode=mode, dtype=x.dtype, stream=streams[lane])
            y = mx.matmul(x, w.T, stream=streams[lane])
        else:
            y = mx.quantized_matmul(x, packed, block_scales, block_biases, transpose=True,
                                    group_size=group_size, bits=bits, mode=mode, stream=streams[lane])
        previous[lane] = y
        parts.append(y)
    return join(parts, axis=-1)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` with the CPU route described above."""

    def __call__(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().__call__(x)
        y = cpu_quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                 self.group_size, self.bits, self.mode)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose LM-head use (`as_linear`) takes the CPU route."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().as_linear(x)
        return cpu_quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                    self.group_size, self.bits, self.mode)


def use_cpu_routes(model: nn.Module) -> None:
    """Give every quantized linear layer and embedding of `model` the CPU route
    (the classes only add a branch; parameters are untouched)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = QuantizedEmbedding
