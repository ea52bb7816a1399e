"""Per-tensor quantization decisions: which tensor gets which bits, and why.

Decision table (module paths as in the converted checkpoint; "body" is `--q-bits`
in `--q-mode`; "8-bit" is affine 8-bit at the body's group size, or mxfp8 when the
body uses a float format):

| tensor | default | mixed | uniform |
|---|---|---|---|
| `embed_tokens` (also the tied LM head), untied `lm_head` | 8-bit | 8-bit | body |
| `embed_tokens_per_layer` (PLE table, E2B/E4B) | 8-bit | 8-bit | body |
| PLE projections (`per_layer_model_projection`, `per_layer_input_gate`, `per_layer_projection`) | body | 8-bit | body |
| attention `q/k/v/o_proj`, MLP `gate/up/down_proj` | body | body | body |
| dense MLP of MoE layers (26B-A4B, runs beside the experts) | body | 8-bit | body |
| expert stacks `experts.switch_glu.*` (quantized whole, for `gather_qmm`) | body | body | body |
| `router.proj` | float | float | float |
| norms, `layer_scalar`, `router.scale`, `per_expert_scale` (1-D) | float | float | float |
| vision/audio towers and `embed_vision`/`embed_audio` | float, never float16 | same | same |
| any matrix narrower than one group, or whose width no allowed group size divides | float | float | float |
| a layer's expert stacks when one of the three must stay float (they run together) | float | float | float |

Why: the PLE table at 4-bit is reported to give garbage output, and the embedding
doubles as the LM head, so both stay at 8-bit (they are large, but 8-bit still
halves them). The router picks experts discontinuously and is tiny, so it stays
float. Keeping the 26B-A4B dense MLP at 8-bit was measured elsewhere to cut
perplexity markedly for +0.3 GB. The 26B/31B vision tower overflows float16, and
quantizing the encoders is unmeasured, so they are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import ConvertError

# Float formats fix their own bits and group size.
FLOAT_MODES: Dict[str, Tuple[int, int]] = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine", *FLOAT_MODES)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64

TOWER_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")

_EMBEDDING = re.compile(r"language_model\.(model\.embed_tokens|lm_head)$")
_PLE_TABLE = re.compile(r"language_model\.model\.embed_tokens_per_layer$")
_PLE_PROJ = re.compile(
    r"language_model\.model\.(per_layer_model_projection|layers\.\d+\.(per_layer_input_gate|per_layer_projection))$"
)
_ROUTER = re.compile(r"\.router\.proj$")
_DENSE_MLP = re.compile(r"\.layers\.\d+\.mlp\.(gate|up|down)_proj$")


@dataclass(frozen=True)
class Quant:
    """How one module is quantized; the dict form is what `config.json` stores."""

    bits: int
    group_size: int
    mode: str

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class Recipe:
    """A named policy: which body bits it accepts and which tensor groups go to 8-bit."""

    name: str
    description: str
    body_bits: Tuple[int, ...]
    eight_bit: Tuple[re.Pattern, ...]
    moe_dense_mlp_8bit: bool = False


RECIPES: Dict[str, Recipe] = {
    "default": Recipe(
        "default", "body at --q-bits; embeddings and the PLE table at 8-bit; router, norms and towers float",
        (4, 8), (_EMBEDDING, _PLE_TABLE),
    ),
    "mixed": Recipe(
        "mixed", "body at --q-bits (3-6); embeddings, all PLE tensors and the MoE dense MLP at 8-bit",
        (3, 4, 5, 6), (_EMBEDDING, _PLE_TABLE, _PLE_PROJ), moe_dense_mlp_8bit=True,
    ),
    "uniform": Recipe(
        "uniform", "every quantizable matrix at --q-bits, embeddings and PLE included (as mlx-vlm does; "
        "not recommended below 8 bits)", (4, 8), (),
    ),
}


@dataclass(frozen=True)
class Plan:
    """The conversion-wide settings a recipe is applied with."""

    recipe: Recipe
    body: Quant

    def eight_bit(self) -> Quant:
        if self.body.mode == "affine":
            return Quant(8, self.body.group_size, "affine")
        bits, group = FLOAT_MODES["mxfp8"]
        return Quant(bits, group, "mxfp8")


def make_plan(recipe: str = "default", bits: Optional[int] = None, group_size: Optional[int] = None,
              mode: str = "affine") -> Plan:
    """Validate the user's quantization options into a `Plan` (ConvertError if unsupported)."""
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}")
    if mode not in MODES:
        raise ConvertError(f"unknown --q-mode '{mode}'; choose one of {', '.join(MODES)}")
    chosen = RECIPES[recipe]
    if mode in FLOAT_MODES:
        mode_bits, mode_group = FLOAT_MODES[mode]
        if bits not in (None, mode_bits):
            raise ConvertError(f"--q-mode {mode} is {mode_bits}-bit; drop --q-bits {bits}")
        if group_size not in (None, mode_group):
            raise ConvertError(f"--q-mode {mode} uses group size {mode_group}; drop --q-group-size {group_size}")
        return Plan(chosen, Quant(mode_bits, mode_group, mode))
    bits = 4 if bits is None else bits
    if bits not in chosen.body_bits:
        allowed = "/".join(str(b) for b in chosen.body_bits)
        raise ConvertError(f"{bits}-bit is not supported by recipe '{recipe}' (it allows {allowed} bits)")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES))
        raise ConvertError(f"group size {group_size} is not supported; choose one of {choices}")
    return Plan(chosen, Quant(bits, group_size, mode))


def is_tower(name: str) -> bool:
    """Vision/audio encoder weights and their projections into the text model."""
    return name.startswith(TOWER_PREFIXES)


def decide(plan: Plan, module: str, shape: Tuple[int, ...], quantizable: bool, moe_layer: bool) -> Optional[Quant]:
    """The quantization of `module`'s weight of `shape`, or None to keep it float.

    `quantizable`: the model's module can be swapped for a quantized one (Linear,
    Embedding, stacked experts); `moe_layer`: the module sits in a layer with experts.
    Raises ConvertError when the chosen group size does not divide the input
    dimension but a smaller allowed one would (the user can fix it).
    """
    if not quantizable or is_tower(module) or _ROUTER.search(module) or len(shape) < 2:
        return None
    quant = plan.body
    if any(p.search(module) for p in plan.recipe.eight_bit) or (
        plan.recipe.moe_dense_mlp_8bit and moe_layer and _DENSE_MLP.search(module)
    ):
        quant = plan.eight_bit()
    width = shape[-1]
    # No group size this mode allows fits (tiny test models only; every real
    # Gemma 4 width is a multiple of 64): keep it float.
    smallest = min(GROUP_SIZES) if quant.mode == "affine" else quant.group_size
    if width < quant.group_size or width % smallest:
        return None
    if width % quant.group_size:
        raise ConvertError(
            f"group size {quant.group_size} does not divide the input dimension {width} of {module}.weight "
            f"{tuple(shape)}; pick a --q-group-size that divides {width}"
        )
    return quant
