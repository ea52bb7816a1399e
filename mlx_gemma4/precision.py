"""The compute-dtype policy: which dtype the activations use, and which weights follow.

MLX's CPU backend runs `quantized_matmul` about 8x faster with float32
activations than with bfloat16 ones (10x faster than float16), and its bfloat16
GEMM is no faster than float32; on a GPU the checkpoint's own 16-bit dtype
halves the bytes moved. So by default ("auto") the text model computes in
float32 on the CPU and in the checkpoint's dtype on a GPU.

Only what a kernel reads per token follows the compute dtype:
- float matrices (unquantized projections, the router, a tied unquantized
  embedding, which doubles as the LM head) and 1-D tensors (norms, scalars);
- never the packed quantized weights; their scales/biases only when that does
  not grow them (float32 activations with bfloat16 scales run at float32 speed,
  measured: 12.6 ms vs 14.0 ms for a 4096x2048 4-bit matmul; MLX casts them per
  call, which the CPU route in `quantized` bounds to a few MB by splitting
  large products, the tied LM head included);
- never a lookup-only embedding table (the PLE table, an untied embedding):
  its rows are cast after the lookup (`TextModel.compute_dtype`);
- never the vision/audio towers to float16 (their activations overflow it);
- the MoE router always in float32 (it routes in float32 and is tiny).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import mlx.core as mx

DTYPES = ("float32", "bfloat16", "float16")
_TOWERS = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
_EMBED = "language_model.model.embed_tokens."
_PLE_TABLE = "language_model.model.embed_tokens_per_layer."


def cpu_backend() -> bool:
    """Whether arrays are computed on MLX's CPU backend, where some kernels
    (`quantized_matmul` over many rows, `gather_qmm`) are slow and the layers
    take another route. `benchmarks/graph.py` patches it to count the GPU graph."""
    return mx.default_device() == mx.cpu


def checkpoint_dtype(weights: Dict[str, mx.array]) -> mx.Dtype:
    """The text model's stored float dtype (read off the token embedding)."""
    for name in (_EMBED + "scales", _EMBED + "weight"):
        value = weights.get(name)
        if value is not None and mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def compute_dtype(requested: Union[None, str, mx.Dtype], stored: mx.Dtype,
                  device: Optional[mx.Device] = None) -> mx.Dtype:
    """`requested` as a dtype; None or "auto" picks float32 on the CPU backend
    and the checkpoint's `stored` dtype on a GPU."""
    if isinstance(requested, mx.Dtype):
        return requested
    if requested is None or requested == "auto":
        device = device or mx.default_device()
        return mx.float32 if device.type == mx.cpu else stored
    if requested not in DTYPES:
        raise ValueError(f"dtype '{requested}' is not one of auto, {', '.join(DTYPES)}")
    return getattr(mx, requested)


def cast_weights(weights: Dict[str, mx.array], dtype: mx.Dtype, tied_embedding: bool) -> Dict[str, mx.array]:
    """`weights` with what the kernels read cast to `dtype` (see the module docstring)."""
    quantized = {k[: -len("scales")] for k in weights if k.endswith(".scales")}

    def target(name: str, value: mx.array) -> mx.Dtype:
        if not mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
        if ".router." in name:  # also when the compute dtype is the stored one (a GPU)
            return mx.float32
        if value.dtype == dtype:
            return value.dtype
        if name.startswith(_TOWERS):
            return value.dtype if dtype == mx.float16 else dtype
        module = name[: name.rfind(".") + 1]
        if module in quantized:
            return value.dtype if dtype.size > value.dtype.size else dtype
        lookup_only = module == _PLE_TABLE or (module == _EMBED and not tied_embedding)
        return value.dtype if lookup_only and value.ndim == 2 else dtype

    return {k: v.astype(target(k, v)) for k, v in weights.items()}
