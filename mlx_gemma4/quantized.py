"""Products on the CPU backend: spread over the cores, and (quantized ones)
dequantized first for many rows.

MLX's CPU `quantized_matmul` and its bundled reference BLAS each run on one
thread; a product split by output rows over the CPU streams (see `streams`)
runs the parts at once (2 cores: 1.9x faster for one decode row, 1.3-1.6x for
a 128-row prefill chunk; measured in benchmarks/RESULTS.md).

MLX's CPU `quantized_matmul` also handles a batch of rows as that many one-row
products, so a prefill chunk gets no reuse of the weights it unpacks. For a
chunk of at least `DEQUANTIZE_MIN_ROWS` rows it is faster to dequantize the
matrix block by block and run matrix products: 1.2-1.3x faster with the
reference BLAS, and about 20x faster when MLX's `cblas_sgemm` is an optimised
BLAS. Below ~64 rows the unpacking costs more than it saves.

The blocks are unpacked by one compiled elementwise kernel (`dequantize`)
rather than `mx.dequantize`, whose CPU version is ~50 primitives computing in
the scales' dtype: with bfloat16 scales its weights are rounded to bfloat16
(up to 5e-4 off the float32 values `quantized_matmul` uses), its temporaries
take 3.5x the block, and it is 1.4x slower.

A prefill chunk's MLP is taken block by block of its intermediate width
(`cpu_gated_mlp`), so its widest activations never exist whole.

Unquantized layers (the vision and audio towers, float checkpoints) have their
products split by output columns over the streams too (`split_matmul`).

On a GPU, `quantized_matmul` and `matmul` have real many-row, many-core kernels
and are always used.
"""

from __future__ import annotations

from functools import lru_cache, partial, reduce
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import precision, streams

DEQUANTIZE_MIN_ROWS = 64
# Dequantize at most this many weights at once (512 KB in float32). MLX's CPU
# eval allocates the outputs of dozens of primitives ahead of the compute, so a
# whole matrix's blocks can be alive at once. Measured, 128 rows, 2 streams:
# 2816x8192, 8192x5376 and 5376x16384 4-bit products peak at 11 / 9 / 20 MB
# above their input with 128 K-weight blocks, 21 / 20 / 31 MB with 512 K, at the
# same speed (within 2 %); E2B 10-layer prefill of 128 tokens, 23 vs 26 MB.
DEQUANTIZE_MAX_WEIGHTS = 1 << 17
# Bounds on the weights of one part of a packed product. Below the lower one
# another thread gains less than the hand-over costs (measured: a 128x1536
# 4-bit matrix is slower split in two, a 256x1536 one 1.4x faster). The upper
# one bounds what a part casts: MLX casts bfloat16 scales and biases to the
# activations' float32 per call (2 MB per 16 M weights), and its CPU eval
# allocates the outputs of ~100 calls ahead of their compute, so the casts of
# many parts of one matrix are alive at once. The tied LM head (the vocabulary
# times the width: 25x the next largest matrix of E2B) takes smaller parts.
# Measured on E2B (10 layers, 128-token prompt), decode peak above the weights
# and tok/s: LM head parts of 16 M weights 30-32 MB, 2.54-2.60; of 4 M, 12 MB,
# 2.56-2.64. All parts at 4 M: the same on E2B, 26B-A4B 4 % slower (2.35 vs
# 2.45 tok/s) with an unchanged peak (51 MB, the chosen experts' copies).
# `split_matmul` applies the lower bound to a float product's rows x weights:
# one row by 1536x128 (197 K weights) split in two measured 1.25x faster, by
# 1536x512 1.61x.
MIN_WEIGHTS_PER_PART = 1 << 17
MAX_WEIGHTS_PER_PART = 1 << 24
MAX_LM_HEAD_PART = 1 << 22


@partial(mx.compile, shapeless=True)
def _affine_values(words: mx.array, shifts: mx.array, mask: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    return ((words >> shifts) & mask).astype(scales.dtype) * scales + biases


@partial(mx.compile, shapeless=True)
def _scaled_affine_values(words: mx.array, shifts: mx.array, mask: mx.array, scales: mx.array, biases: mx.array,
                          scale: mx.array) -> mx.array:
    return _affine_values(words, shifts, mask, scales, biases).astype(scale.dtype) * scale


@lru_cache(maxsize=None)
def _unpack_constants(bits: int) -> Tuple[mx.array, mx.array]:
    """The shifts of the values in a packed word and their mask, made (and
    evaluated, so any thread may read them) once per bit width."""
    shifts, mask = mx.arange(0, 32, bits, dtype=mx.uint32), mx.array((1 << bits) - 1, dtype=mx.uint32)
    mx.eval(shifts, mask)
    return shifts, mask


def dequantize(weight: mx.array, scales: mx.array, biases: Optional[mx.array], group_size: int, bits: int,
               mode: str, dtype: mx.Dtype, stream: Optional[mx.Stream] = None) -> mx.array:
    """`mx.dequantize` computed in `dtype` (float32 on the CPU): for affine
    quantization with 2, 4 or 8 bits, one fused kernel (see the module notes)."""
    if mode != "affine" or biases is None or 32 % bits:
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=dtype,
                             stream=stream)
    rows, groups = scales.shape
    with streams.on(stream):
        # [rows, groups, words per group, 1] >> [per_word] shifts: element j of a
        # group is bits (j % per_word) * bits of word j // per_word.
        words = weight.reshape(rows, groups, group_size * bits // 32, 1)
        per_group = (rows, groups, 1, 1)
        values = _affine_values(words, *_unpack_constants(bits), scales.astype(dtype).reshape(per_group),
                                biases.astype(dtype).reshape(per_group))
        return values.reshape(rows, groups * group_size)


def _block(layer: nn.Module, rows: slice, groups: slice, after: mx.array) -> tuple:
    """Rows `rows` and quantization groups `groups` (of the input columns) of a
    quantized layer's packed weight, scales and biases (or None), read only once
    `after` exists: otherwise the scheduler may unpack (or cast the scales of)
    many blocks and layers up front, holding all their float32 copies at once."""
    per_group = layer.group_size * layer.bits // 32  # packed words per group
    words = slice(None) if groups == slice(None) else slice(groups.start * per_group, groups.stop * per_group)
    inputs = [layer["weight"][rows, words], layer["scales"][rows, groups]]
    inputs += [layer["biases"][rows, groups]] if "biases" in layer else []
    packed, scales, *biases = mx.depends(inputs, [after])
    return packed, scales, biases[0] if biases else None


def _unpack_block(layer: nn.Module, rows: slice, groups: slice, after: mx.array, dtype: mx.Dtype,
                  stream: Optional[mx.Stream]) -> mx.array:
    """`_block`, dequantized in `dtype` on `stream`."""
    return dequantize(*_block(layer, rows, groups, after), layer.group_size, layer.bits, layer.mode, dtype, stream)


def cpu_quantized_matmul(x: mx.array, layer: nn.Module, max_part: int = MAX_WEIGHTS_PER_PART) -> mx.array:
    """`x @ dequantize(layer.weight).T` for a quantized linear layer or embedding,
    in blocks of output columns dealt round the CPU streams (parts of at most
    `max_part` weights for few rows)."""
    rows, in_features, out_features = x.size // x.shape[-1], x.shape[-1], layer["weight"].shape[0]
    lanes = streams.cpu_streams()
    many_rows = rows >= DEQUANTIZE_MIN_ROWS
    if many_rows:
        step = DEQUANTIZE_MAX_WEIGHTS // in_features
    else:
        per_stream = -(-out_features // len(lanes))
        step = min(max(per_stream, MIN_WEIGHTS_PER_PART // in_features), max_part // in_features)
    step = max(step, 1)
    parts, previous = [], {}
    for i, start in enumerate(range(0, out_features, step)):
        lane = i % len(lanes)
        block, after = slice(start, start + step), previous.get(lane, x)
        if many_rows:
            w = _unpack_block(layer, block, slice(None), after, x.dtype, lanes[lane])
            y = mx.matmul(x, w.T, stream=lanes[lane])
        else:
            y = mx.quantized_matmul(x, *_block(layer, block, slice(None), after), transpose=True,
                                    group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
                                    stream=lanes[lane])
        previous[lane] = y
        parts.append(y)
    return streams.join(parts, axis=-1)


def cpu_gated_mlp(x: mx.array, gate_up: nn.Module, down: nn.Module,
                  activation: Callable[[mx.array, mx.array], mx.array]) -> Optional[mx.array]:
    """`down(activation(gate, up))` of a prefill chunk on the CPU, `gate_up` the
    fused [gate; up] projection; None where this does not apply (fewer than
    `DEQUANTIZE_MIN_ROWS` rows, unquantized layers, biases).

    The intermediate width is taken in blocks dealt round the CPU streams: each
    block's gate and up rows and the matching down columns are unpacked, and its
    share of the output is added to its stream's sum. So the [rows, 2 x
    intermediate] activations and their concatenation never exist (measured on
    31B's MLP, 128 rows: peak 25 vs 61 MB, and 9 % faster).
    """
    rows, hidden = x.size // x.shape[-1], x.shape[-1]
    layers = (gate_up, down)
    if rows < DEQUANTIZE_MIN_ROWS or any(type(m) is not QuantizedLinear or "bias" in m for m in layers):
        return None
    width = down.scales.shape[-1] * down.group_size
    # Gate, up and down blocks together unpack at most DEQUANTIZE_MAX_WEIGHTS weights.
    step = max(DEQUANTIZE_MAX_WEIGHTS // (3 * hidden) // down.group_size, 1) * down.group_size
    flat = x.reshape(rows, hidden)
    lanes, sums = streams.cpu_streams(), {}
    for i, start in enumerate(range(0, width, step)):
        lane = i % len(lanes)
        stop = min(start + step, width)
        unpack = partial(_unpack_block, after=sums.get(lane, flat), dtype=x.dtype, stream=lanes[lane])
        gate = unpack(gate_up, slice(start, stop), slice(None))
        up = unpack(gate_up, slice(width + start, width + stop), slice(None))
        back = unpack(down, slice(None), slice(start // down.group_size, stop // down.group_size))
        with streams.on(lanes[lane]):
            h = activation(flat @ gate.T, flat @ up.T)
            sums[lane] = h @ back.T if lane not in sums else mx.addmm(sums[lane], h, back.T)
    return reduce(mx.add, sums.values()).reshape(*x.shape[:-1], hidden)


def split_matmul(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T` for a float `weight` `[out, in]`, its output columns split
    over the CPU streams when the product is large enough to gain from it."""
    rows = x.size // x.shape[-1]
    lanes = streams.cpu_streams()
    parts = min(len(lanes), rows * weight.size // MIN_WEIGHTS_PER_PART, weight.shape[0])
    if parts <= 1:
        return x @ weight.T
    bounds = streams.split_points(weight.shape[0], parts)
    return streams.join([mx.matmul(x, w.T, stream=stream)
                         for w, stream in zip(mx.split(weight, bounds), lanes)], axis=-1)


class Linear(nn.Linear):
    """`nn.Linear` with the CPU route (`split_matmul`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().__call__(x)
        y = split_matmul(x, self.weight)
        return y + self["bias"] if "bias" in self else y


class Embedding(nn.Embedding):
    """`nn.Embedding` whose use as the (tied) LM head takes the CPU route."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().as_linear(x)
        return split_matmul(x, self.weight)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` with the CPU route described above."""

    def __call__(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().__call__(x)
        y = cpu_quantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` with the CPU routes: rows unpacked in float32 (MLX's
    lookup computes them in the scales' dtype, bfloat16 in real checkpoints, so
    they would enter a float32 model already rounded), and the split LM head."""

    def __call__(self, ids: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().__call__(ids)
        flat = ids.flatten()
        biases = self["biases"][flat] if "biases" in self else None
        rows = dequantize(self["weight"][flat], self["scales"][flat], biases, self.group_size, self.bits, self.mode,
                          mx.float32)
        return rows.reshape(*ids.shape, -1)

    def scaled_rows(self, ids: mx.array, scale: mx.array) -> mx.array:
        """`self(ids)` times `scale` (0-d), in `scale`'s dtype. On a GPU, affine
        tables of 2, 4 or 8 bits unpack, scale and cast the rows in one kernel,
        where a dequantize and a multiply took two, in the same order of
        operations as they (so with the same roundings)."""
        if precision.cpu_backend() or self.mode != "affine" or "biases" not in self or 32 % self.bits:
            return self(ids).astype(scale.dtype) * scale
        flat = ids.flatten()
        words = self["weight"][flat].reshape(flat.size, -1, self.group_size * self.bits // 32, 1)
        scales, biases = (self[name][flat][..., None, None] for name in ("scales", "biases"))
        rows = _scaled_affine_values(words, *_unpack_constants(self.bits), scales, biases, scale)
        return rows.reshape(*ids.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        if not precision.cpu_backend():
            return super().as_linear(x)
        return cpu_quantized_matmul(x, self, MAX_LM_HEAD_PART)


_ROUTED = {nn.Linear: Linear, nn.Embedding: Embedding,
           nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def use_cpu_routes(model: nn.Module) -> None:
    """Give every linear layer and embedding of `model` the CPU route (the
    classes only add a branch; parameters are untouched)."""
    for _, module in model.named_modules():
        routed = _ROUTED.get(type(module))
        if routed is not None:
            module.__class__ = routed
