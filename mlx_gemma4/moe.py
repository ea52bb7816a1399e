"""The 26B-A4B mixture of experts: a router and a batched expert gather.

mlx-lm has equivalent switch layers, but importing any `mlx_lm` module runs its
package `__init__`, which imports transformers (and torch where installed):
about 2.4 s and several hundred MB before the first token. The gather layers
are a few lines of `mx.gather_mm` / `mx.gather_qmm`, so they live here.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import precision, streams
from .config import TextConfig
from .kernels import geglu, weighted_geglu

# Sorting tokens by expert makes the gathered weight reads contiguous; it pays
# off once there are more (token, expert) pairs than a decode step has.
_SORT_THRESHOLD = 64

# What a block of output columns holds on the CPU: in a prefill the casts of
# its scales and biases (see `Experts.cpu_prefill`), in a decode step also its
# copied weights (see `QuantizedExpertLinear`). Measured, one 26B-A4B layer's
# experts (0.5 MB: 64 blocks per projection), prefill peak above their input:
# 14 MB for 128 tokens and 31-36 MB for 512, against 111 and 173-179 MB with
# whole stacks cast, at the same speed (3.1 and 12.2-12.5 s); 1 MB: 23 and
# 46-51 MB.
_BLOCK_BYTES = 1 << 19


class Router(nn.Module):
    """Picks `top_k_experts` per token and their weights, as transformers does:
    softmax over all experts, top-k, renormalise, times a learned per-expert scale
    (returned apart, so the experts apply it together with the weights)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = mx.ones((config.hidden_size,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self._input_scale = config.hidden_size**-0.5
        self._norm_in_proj = False  # see `fold_norm_weight`

    def norm_weight(self) -> mx.array:
        """The weight of the router's norm of the residual stream, with the
        constant input scale folded in, in float32."""
        return self.scale.astype(mx.float32) * self._input_scale

    def fold_norm_weight(self) -> None:
        """Fold the norm's weight into the projection's columns (load time): a
        multiply fewer per step, the product rounded once in float32. A
        quantized projection (not one of ours: the converter keeps the router
        in float) keeps the multiply."""
        if "scales" in self.proj:
            return
        self.proj.weight = self.proj.weight.astype(mx.float32) * self.norm_weight()
        self._norm_in_proj = True

    def __call__(self, normed: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        """`normed`: the residual stream RMS-normed without a weight, in float32.
        Routing is discontinuous: in bfloat16 near-tied experts flip. The router
        is tiny, so it runs in float32 whatever the model dtype (the loader keeps
        its weights in float32). Returns the chosen experts, their softmax
        weights and their per-expert scales, each `[..., top_k]`."""
        z = normed if self._norm_in_proj else normed * self.norm_weight()
        logits = self.proj(z).astype(mx.float32)
        # Top-k of the logits is the top-k of the softmax; renormalising the
        # softmax over the chosen k equals a softmax over their logits.
        # Integer choices carry no gradient (training would otherwise ask the gathers for one).
        experts = mx.stop_gradient(mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k:])
        weights = mx.softmax(mx.take_along_axis(logits, experts, axis=-1), axis=-1)
        return experts, weights, self.per_expert_scale[experts]


@lru_cache(maxsize=8)
def _ones(k: int, dtype: mx.Dtype) -> mx.array:
    """`[1, k]` ones: the row that sums `k` expert outputs in one matmul."""
    ones = mx.ones((1, k), dtype)
    mx.eval(ones)
    return ones


@lru_cache(maxsize=32)
def _row_indices(shape: Tuple[int, ...]) -> mx.array:
    """The `lhs_indices` of a gather in which every row of `x` reads itself.
    Left out, MLX builds this arange anew in every step's graph; it only
    depends on the shape, so it is made (and evaluated) once per shape."""
    rows = mx.arange(math.prod(shape), dtype=mx.uint32).reshape(shape)
    mx.eval(rows)
    return rows


def _lhs_indices(x: mx.array, sorted_indices: bool) -> Optional[mx.array]:
    """None for a sorted gather: MLX marks a gather as sorted by expert only
    when it has no `lhs_indices` (ops.cpp), and only then does Metal run the
    kernel that reads each expert's weights once for all its rows."""
    return None if sorted_indices else _row_indices(x.shape[:-2])


def _sort_by_expert(indices: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """The (token, expert) pairs of `indices` [..., k] sorted by expert: their
    positions among the flattened pairs, their tokens and their experts."""
    flat = indices.flatten()
    order = mx.argsort(flat)
    return order, order // indices.shape[-1], flat[order]


class ExpertLinear(nn.Module):
    """`num_experts` stacked linear maps; each row of `x` uses the expert its index picks."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), lhs_indices=_lhs_indices(x, sorted_indices),
                            rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None, mode: str = "affine"):
        """Quantize the whole stack at once, so `gather_qmm` can read it."""
        return QuantizedExpertLinear.from_weight(self.weight, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, weight: mx.array, scales: mx.array, biases: Optional[mx.array],
                 group_size: int, bits: int, mode: str):
        super().__init__()
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.freeze()

    @classmethod
    def from_weight(cls, weight, group_size, bits, mode) -> "QuantizedExpertLinear":
        packed = mx.quantize(weight, group_size, bits, mode=mode)
        q, scales = packed[0], packed[1]
        biases = packed[2] if len(packed) > 2 else None
        # Recover the defaults mlx chose for this mode.
        group_size = weight.shape[-1] // scales.shape[-1]
        bits = q.shape[-1] * 32 // weight.shape[-1]
        return cls(q, scales, biases, group_size, bits, mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        if precision.cpu_backend() and not sorted_indices:  # GPUs keep the gather kernel
            # MLX's CPU gather_qmm casts the whole stacks of scales and biases to
            # the activations' dtype in every call (ops.cpp): one token's experts
            # (a decode step) are copied out instead. Two or more tokens take
            # `Experts.cpu_prefill`, where the copies would grow with the tokens.
            return self._copied_experts_matmul(x, indices)
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), lhs_indices=_lhs_indices(x, sorted_indices),
            rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )

    def column_blocks(self, width: int, dtype: mx.Dtype, lanes: Tuple[Optional[mx.Stream], ...],
                      copied: Optional[int] = None) -> List[Tuple[Optional[mx.Stream], int, int]]:
        """The first `width` output columns cut into blocks of about `_BLOCK_BYTES`,
        dealt out to the CPU streams `lanes` in turn: (stream, start, stop) each.
        A block holds its columns' scales and biases cast to `dtype`: every
        expert's, or `copied` experts' along with their copied weights."""
        floats = [a for a in (self.scales, self.get("biases")) if a is not None and mx.issubdtype(a.dtype, mx.floating)]
        per_column = sum(a.shape[-1] for a in floats) * dtype.size
        if copied is None:
            per_column *= self.weight.shape[0]
        else:
            stored = [a for a in (self.weight, self.scales, self.get("biases")) if a is not None]
            per_column = copied * (per_column + sum(a.shape[-1] * a.itemsize for a in stored))
        blocks = math.ceil(width / max(1, _BLOCK_BYTES // per_column)) if per_column else 1
        bounds = [0, *streams.split_points(width, blocks), width]
        return [(lanes[i % len(lanes)], start, stop) for i, (start, stop) in enumerate(zip(bounds, bounds[1:]))]

    def gather_columns(self, x: mx.array, rows: mx.array, experts: mx.array, columns: slice) -> mx.array:
        """Output `columns` of row `rows[i]` of `x` through expert `experts[i]`.
        MLX's CPU gather casts the scales (and biases) it is given to `x`'s
        dtype, whole stacks in every call: only these columns' are cast here
        (the integer exponents of the microscaling modes stay as they are)."""
        quantization = [a[:, columns] for a in (self.scales, self.get("biases")) if a is not None]
        # Cast once `x` exists, not ahead of it (measured on the 4-layer 26B-A4B
        # benchmark's 128-token prefill: peak 33-37 against 39-40 MB).
        scales, *biases = mx.depends(quantization, [x])
        biases = biases[0] if biases else None
        if mx.issubdtype(scales.dtype, mx.floating):
            scales = scales.astype(x.dtype)
        if biases is not None:
            biases = biases.astype(x.dtype)
        return mx.gather_qmm(x, self.weight[:, columns], scales, biases, lhs_indices=rows, rhs_indices=experts,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)

    def _copied_experts_matmul(self, x: mx.array, indices: mx.array) -> mx.array:
        """The chosen experts' weights copied out a block of output columns at a
        time, each block's product on the next CPU stream. MLX allocates each
        output as it dispatches, up to about 100 operations ahead of the compute,
        so the small blocks bound what the copies hold: one 26B-A4B layer's 8
        experts peak at 12 MB and take 19 ms, against 32 MB and 22-70 ms copied
        whole (the two streams' whole copies contended)."""
        quantized = (self.weight, self.scales, self.get("biases"))
        parts = []
        for stream, start, stop in self.column_blocks(self.weight.shape[-2], x.dtype, streams.cpu_streams(),
                                                      copied=indices.size):
            with streams.on(stream):
                weight, scales, biases = (None if a is None else mx.take(a[:, start:stop], indices, axis=0)
                                          for a in quantized)
                parts.append(mx.quantized_matmul(x, weight, scales, biases, transpose=True,
                                                 group_size=self.group_size, bits=self.bits, mode=self.mode))
        return streams.join(parts, axis=-1)


class ExpertGLU(nn.Module):
    """GeGLU experts evaluated only for the chosen (token, expert) pairs."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = ExpertLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array, scales: mx.array) -> mx.array:
        """`x` [..., H]; `indices`, their routing `weights` and per-expert `scales`
        [..., k] → [..., k, H], each expert's output times its weight and scale."""
        shape = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, H]: one row per token
        sort = indices.size >= _SORT_THRESHOLD
        if sort:
            order, tokens, indices = _sort_by_expert(indices)
            x = x.flatten(0, -3)[tokens]
            weights, scales = weights.flatten()[order], scales.flatten()[order]
        if "gate_up_proj" in self:  # fused at load time (see `fusion`)
            gate, up = mx.split(self.gate_up_proj(x, indices, sort), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, indices, sort), self.up_proj(x, indices, sort)
        h = weighted_geglu(gate, up, weights[..., None, None], scales[..., None, None])
        y = self.down_proj(h, indices, sort)
        if sort:
            y = mx.unflatten(y[mx.argsort(order)], 0, shape)
        return y.squeeze(-2)


class Experts(nn.Module):
    """All experts as stacked weights, read with one batched gather per projection;
    the `switch_glu.{gate,up,down}_proj` names are those of MLX checkpoints
    converted by mlx-vlm / mlx-community."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.switch_glu = ExpertGLU(config.hidden_size, config.moe_intermediate_size, config.num_experts)

    @property
    def quantized(self) -> bool:
        return "scales" in self.switch_glu.down_proj

    def use_float32_on_cpu(self) -> None:
        """MLX's CPU `gather_mm` accepts only float32 (`gather_qmm` accepts any
        float type): on the CPU, unquantized expert stacks are kept in float32."""
        if self.quantized or not precision.cpu_backend():
            return
        for proj in self.switch_glu.children().values():
            proj.weight = proj.weight.astype(mx.float32)

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array, scales: mx.array,
                 after: Optional[mx.array] = None) -> mx.array:
        """The experts' output for `x` [..., H]: the sum over the `experts` [..., k]
        the router chose of each one's output times its routing weight and scale.
        `after`: what a CPU prefill waits for before it starts (see `cpu_prefill`)."""
        # On the CPU one token (a decode step) copies its k experts out (see
        # `QuantizedExpertLinear`); from two tokens on the copies grow with the
        # tokens and the column blocks hold none (one 26B-A4B layer, 2 / 3 / 6
        # tokens: 50 / 59 / 107 ms and 10 MB, against 44 / 58 / 121 ms and 14 /
        # 16 / 21 MB copying; one token: 51 ms against 19 ms, both 11-12 MB).
        if self.quantized and precision.cpu_backend() and experts.size > experts.shape[-1]:
            return self.cpu_prefill(x, experts, weights * scales, after)
        dtype = x.dtype
        if not self.quantized:
            x = x.astype(self.switch_glu.down_proj.weight.dtype)
        y = self.switch_glu(x, experts, weights, scales)
        # The sum over the k experts as one [1, k] @ [k, H] product (accumulated in float32).
        return (_ones(experts.shape[-1], y.dtype) @ y).squeeze(-2).astype(dtype)

    def cpu_prefill(self, x: mx.array, experts: mx.array, weights: mx.array,
                    after: Optional[mx.array] = None) -> mx.array:
        """The quantized experts of two or more tokens on the CPU, one block of output
        columns at a time, the blocks shared out over the CPU streams.

        MLX's CPU gather needs the scales and biases in the activations' dtype
        (float32 here) and casts whole stacks otherwise: 95 MB per 26B-A4B
        layer, which made its prefill peak 4 % above mlx-vlm's (bfloat16, no
        cast). A block of columns casts only its own: the 4-layer 26B-A4B
        benchmark's 128-token prefill peaks 33-37 MB above the weights against
        136-138 MB (512 tokens: 113-121 against 238-257 MB), at the same speed.
        The (token, expert) rows are sorted by expert, so consecutive rows read
        the same expert's block, and read in place (`lhs_indices`); the routing
        weight scales each row before the down projection (which is linear);
        each block of the down projection adds its rows into its columns of a
        [tokens, hidden] sum. Blocks of rows per stream instead (no wait for the
        whole intermediate `h`) ran the streams one after the other: MLX
        dispatches at most about 100 operations ahead of the compute, and one
        stream's run of blocks is longer than that.

        The blocks start once `after` exists (the layer's dense MLP, whose own
        blocks share the streams): interleaved with those, a stream waiting for
        the other's blocks idled behind the dense MLP's work, and one 26B-A4B
        layer's MLP and experts took 5.1 s against 4.1 s one after the other.
        """
        glu = self.switch_glu
        if "gate_up_proj" in glu:  # fused at load time: the gate's rows, then the up projection's
            gate_proj = up_proj = glu.gate_up_proj
            width = up_offset = gate_proj.weight.shape[-2] // 2
        else:
            gate_proj, up_proj, up_offset = glu.gate_proj, glu.up_proj, 0
            width = gate_proj.weight.shape[-2]
        hidden = x.shape[-1]
        inputs = x.reshape(-1, 1, hidden)
        if after is not None:
            (inputs,) = mx.depends([inputs], [after])
        order, tokens, chosen = _sort_by_expert(experts)
        routing = weights.flatten()[order].astype(x.dtype)[:, None, None]
        lanes = streams.cpu_streams()
        h = []
        for stream, start, stop in gate_proj.column_blocks(width, x.dtype, lanes):
            with streams.on(stream):
                gate = gate_proj.gather_columns(inputs, tokens, chosen, slice(start, stop))
                up = up_proj.gather_columns(inputs, tokens, chosen, slice(up_offset + start, up_offset + stop))
                h.append(geglu(gate, up) * routing)
        h = mx.concatenate(h, axis=-1)
        rows = _row_indices(h.shape[:-2])
        sums = []
        for stream, start, stop in glu.down_proj.column_blocks(hidden, x.dtype, lanes):
            with streams.on(stream):
                y = glu.down_proj.gather_columns(h, rows, chosen, slice(start, stop)).squeeze(-2)
                # Summed in float32 whatever the compute dtype: a token's k outputs add up here.
                sums.append(mx.zeros((inputs.shape[0], stop - start), mx.float32).at[tokens].add(y.astype(mx.float32)))
        return mx.concatenate(sums, axis=-1).reshape(x.shape).astype(x.dtype)
