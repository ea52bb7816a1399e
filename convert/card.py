"""The output's README.md model card and the suggested mlx-community repo name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from mlx_gemma4.config import ModelConfig

from . import recipes
from .quality import format_report, human_bytes


@dataclass
class CardInfo:
    """What the card says about one conversion."""

    base_model: Optional[str]
    model_config: ModelConfig
    plan: Optional[recipes.Plan]
    dtype: str
    decisions: Dict[str, str]  # tensor-group description → its format
    disk_bytes: int
    version: str
    quality: Optional[Dict[str, float]] = None
    license: str = "apache-2.0"
    extra_tags: List[str] = field(default_factory=list)
    repo_id: str = "<this repo>"


def variant(config: ModelConfig) -> str:
    """'e2b', 'e4b', '26b-a4b' or '31b', read from the architecture."""
    text = config.text_config
    if text.enable_moe_block:
        return "26b-a4b"
    if text.hidden_size_per_layer_input:
        return "e2b" if text.use_double_wide_mlp else "e4b"
    return "31b"


def format_suffix(plan: Optional[recipes.Plan], dtype: str) -> str:
    """'4bit', '8bit', '4bit-mixed', 'mxfp4', … or the dtype ('bf16') when not quantized."""
    if plan is None:
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    base = plan.body.mode if plan.body.mode != "affine" else f"{plan.body.bits}bit"
    return base if plan.recipe.name == "default" else f"{base}-{plan.recipe.name}"


def suggested_repo(config: ModelConfig, plan: Optional[recipes.Plan], dtype: str, source_name: Optional[str]) -> str:
    """`mlx-community/gemma-4-<variant>[-it]-<format>`; "-it" unless the source is a known base model."""
    base_model = bool(source_name) and not re.search(r"(^|[-_])it($|[-_])", Path(source_name).name.lower())
    it = "" if base_model else "-it"
    return f"mlx-community/gemma-4-{variant(config)}{it}-{format_suffix(plan, dtype)}"


def model_card(info: CardInfo) -> str:
    """The README.md text: front matter, what was done, the quality report, how to run it."""
    fmt = format_suffix(info.plan, info.dtype)
    has_vision = info.model_config.vision_config is not None
    tags = ["mlx", "gemma4", "mlx-gemma4", *(["quantized"] if info.plan else []), *info.extra_tags]
    front = ["---", f"license: {info.license}", "library_name: mlx",
             f"pipeline_tag: {'image-text-to-text' if has_vision else 'text-generation'}"]
    if info.base_model:
        front.append(f"base_model: {info.base_model}")
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    title = f"# gemma-4-{variant(info.model_config)} ({fmt}, MLX)"
    if info.plan:
        body = info.plan.body
        what = (f"Quantized with recipe **{info.plan.recipe.name}** ({info.plan.recipe.description}); "
                f"body {body.bits}-bit {body.mode}, group size {body.group_size}.")
    else:
        what = f"Not quantized: weights cast to {info.dtype}."
    source = f" from [{info.base_model}](https://huggingface.co/{info.base_model})" if info.base_model else ""
    lines = front + [title, "",
                     f"Converted{source} with `mlx_gemma4.convert` (mlx_gemma4 {info.version}). {what}", "",
                     f"Size on disk: {human_bytes(info.disk_bytes)}.", "",
                     "| tensors | stored as |", "|---|---|"]
    lines += [f"| {group} | {fmt_} |" for group, fmt_ in info.decisions.items()]
    lines.append("")
    if info.quality:
        q = info.quality
        lines += ["## Quality", "",
                  f"Against the unquantized input on {q['prompts']} fixed prompts ({q['positions']} next-token "
                  "distributions):", "",
                  "| mean KL (nats) | max KL | top-1 agreement | disk | input disk |", "|---|---|---|---|---|",
                  f"| {q['mean_kl']:.4g} | {q['max_kl']:.4g} | {q['top1_agreement_pct']:.1f}% | "
                  f"{human_bytes(q['disk_bytes'])} | {human_bytes(q['reference_disk_bytes'])} |", "",
                  "```", format_report(q), "```", ""]
    lines += ["## Use with mlx_gemma4", "", "```bash", "pip install mlx-gemma4",
              f'python -m mlx_gemma4.generate --model {info.repo_id} --prompt "Why is the sky blue?"', "```", "",
              "```python", "import mlx_gemma4", "from mlx_gemma4.generate import generate", "",
              f'model, processor = mlx_gemma4.load("{info.repo_id}")', "```", "",
              "It also loads with mlx-vlm (`mlx_vlm.load`).", ""]
    return "\n".join(lines)
