"""Reading the input checkpoint lazily: HF layout or an MLX (possibly quantized) one.

Nothing is loaded here: `mx.load` maps tensors lazily, dequantizing and renaming
only build graphs, so the writer pulls one tensor at a time into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.config import ModelConfig
from mlx_gemma4.loader import CheckpointError, check_weights, read_config, read_weights
from mlx_gemma4.model import Model

from .errors import ConvertError
from .recipes import is_tower


@dataclass
class Source:
    """A checkpoint ready to convert: its config and its tensors under MLX names."""

    folder: Path
    config: dict
    model_config: ModelConfig
    # Lazy float tensors, MLX names; text tensors already match `model`.
    tensors: Dict[str, mx.array]
    # The model skeleton (never evaluated): tells which modules can be quantized.
    model: Model

    def module(self, path: str) -> Optional[nn.Module]:
        """The model's module at `path`, or None (e.g. a tower this package does not run yet)."""
        return self._modules.get(path)

    def __post_init__(self) -> None:
        self._modules = dict(self.model.named_modules())


def _dequantized(weights: Dict[str, mx.array], quantization: dict) -> Dict[str, mx.array]:
    """Float versions of an MLX checkpoint's quantized modules (lazily), other tensors as they are."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        module = key[: -len(".scales")]
        if f"{module}.weight" not in out:
            raise ConvertError(f"quantized tensor {module} has scales but no weight; the checkpoint is incomplete")
        params = {**defaults, **(quantization.get(module) or {})}
        scales = out.pop(key)
        biases = out.pop(f"{module}.biases", None)
        # Float formats store uint8 scales; their float weights come back as bfloat16.
        dtype = scales.dtype if mx.issubdtype(scales.dtype, mx.floating) else mx.bfloat16
        out[f"{module}.weight"] = mx.dequantize(
            out[f"{module}.weight"], scales, biases, group_size=params.get("group_size"),
            bits=params.get("bits"), mode=params.get("mode", "affine"), dtype=dtype,
        )
    return out


def _mlx_name(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def open_source(folder: Path) -> Source:
    """Read `folder`'s config and map its tensors (ConvertError if unusable)."""
    try:
        config = read_config(folder)
        try:
            model_config = ModelConfig.from_dict(config)
        except ValueError as e:
            raise ConvertError(f"{folder / 'config.json'}: {e}") from None
        weights = read_weights(folder)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    quantization = config.get("quantization")
    if quantization:
        weights = _dequantized(weights, quantization)
    model = Model(model_config)
    text = model.sanitize(weights)
    # Towers the model has no modules for (yet) pass through under their MLX names, unchanged.
    towers = {_mlx_name(k): v for k, v in weights.items() if is_tower(_mlx_name(k))}
    for name, value in towers.items():
        text.setdefault(name, value)
    expected_names = {k for k in text if not is_tower(k) or k.split(".", 1)[0] in model}
    try:
        check_weights(model, {k: text[k] for k in expected_names})
    except CheckpointError as e:
        raise ConvertError(f"{folder}: {e}") from None
    return Source(folder, config, model_config, text, model)
