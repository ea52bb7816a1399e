"""Load-time fusion of projections that read the same input.

Checkpoints (and the converter, which reads parameter names off a fresh
`Model`) keep the separate names `q_proj`/`k_proj`/`v_proj` and
`gate_proj`/`up_proj`. After loading, each group that reads the same input is
concatenated along its output rows into one matmul (`qkv_proj`, `gate_up_proj`):
one kernel launch and one pass over the input instead of two or three, the
same bytes of weights. Quantization groups run along the input dimension, so
concatenating packed weights, scales and biases row-wise is exact.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .moe import ExpertLinear, QuantizedExpertLinear

_QUANT_FIELDS = ("group_size", "bits", "mode")


def concat_outputs(modules: List[nn.Module]) -> Optional[nn.Module]:
    """One linear (or expert-stack) module computing all of `modules`' outputs,
    concatenated; None when they cannot be fused (different quantization)."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        return None
    if any(getattr(m, f, None) != getattr(first, f, None) for m in modules for f in _QUANT_FIELDS):
        return None
    # Linear weights are [out, in]; expert stacks [experts, out, in].
    axis = 1 if isinstance(first, (ExpertLinear, QuantizedExpertLinear)) else 0
    fused = copy.copy(first)
    for name in ("weight", "scales", "biases", "bias"):
        if name in first:
            fused[name] = mx.concatenate([m[name] for m in modules], axis=0 if name == "bias" else axis)
    return fused


def _fuse_into(owner: nn.Module, names: List[str], fused_name: str) -> bool:
    fused = concat_outputs([owner[n] for n in names])
    if fused is None:
        return False
    for n in names:
        delattr(owner, n)
    setattr(owner, fused_name, fused)
    return True


def fuse(model: nn.Module) -> None:
    """Fuse the decoder layers of a loaded `Model` (see `fuse_layers`)."""
    fuse_layers(model.language_model.model.layers)


def fuse_layers(layers: List[nn.Module]) -> None:
    """Fuse, in place, every decoder layer's Q/K/V (when the layer owns K/V),
    the dense MLP's gate/up and the experts' gate/up projections, fold the
    router's norm weight into its projection, and store the constants a step
    would otherwise rebuild from the loaded weights: the stacked q/k norm
    weights and an MoE layer's stacked feed-forward norm weights."""
    for layer in layers:
        attn = layer.self_attn
        if attn.owns_kv:
            names = ["q_proj", "k_proj"] + (["v_proj"] if "v_proj" in attn else [])
            _fuse_into(attn, names, "qkv_proj")
            attn._stacked_norm_weight = attn.stacked_norm_weight()
        if "router" in layer:
            layer.router.fold_norm_weight()
            layer._feed_forward_norm_weights = layer.feed_forward_norm_weights()
        _fuse_into(layer.mlp, ["gate_proj", "up_proj"], "gate_up_proj")
        if "experts" in layer:
            _fuse_into(layer.experts.switch_glu, ["gate_proj", "up_proj"], "gate_up_proj")
