"""`convert()`: one checkpoint in, one MLX checkpoint folder out, tensor by tensor."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
from tqdm import tqdm

import mlx_gemma4
from mlx_gemma4.loader import CheckpointError, resolve

from . import card, hub, recipes
from .errors import ConvertError
from .quality import format_report, quality_report
from .source import Source, open_source
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter, atomic_output, check_output_path, parse_size, write_text

DTYPES = ("bfloat16", "float16", "float32")
# Everything a runtime needs besides weights and config.json: tokenizer, chat
# template, processor/preprocessor and generation configs.
_AUX_PATTERNS = ("*.json", "*.jinja", "tokenizer.model")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "quality.json"}
_EMBEDDING = "language_model.model.embed_tokens.weight"


@dataclass
class ConvertResult:
    """Where the output went and what the quality report measured."""

    path: Path
    quality: Optional[Dict[str, float]]
    suggested_repo: str
    uploaded_to: Optional[str] = None


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _describe(quant: Optional[recipes.Quant], dtype: mx.Dtype) -> str:
    if quant is None:
        return f"float ({_dtype_name(dtype)})"
    return f"{quant.bits}-bit {quant.mode}, group {quant.group_size}"


def _group_label(name: str, ndim: int) -> str:
    """A row of the card's table: towers by prefix, 1-D tensors together, the rest by name with layer numbers folded."""
    for prefix in recipes.TOWER_PREFIXES:
        if name.startswith(prefix):
            return f"`{prefix}*`"
    if ndim < 2:
        return "norms, scalars and other 1-D tensors"
    return "`" + re.sub(r"\.layers\.\d+\.", ".layers.N.", name.removesuffix(".weight")) + "`"


def _card_table(decisions: Dict[str, Optional[recipes.Quant]], shapes: Dict[str, Tuple[int, ...]],
                stored: Dict[str, mx.Dtype]) -> Dict[str, str]:
    """Model-card rows: tensor group → how it is stored (several formats joined by " / ")."""
    formats: Dict[str, Dict[str, None]] = {}
    # Text matrices first, then 1-D tensors, then the towers.
    for name in sorted(decisions, key=lambda n: (recipes.is_tower(n), len(shapes[n]) < 2, n)):
        label = _group_label(name, len(shapes[name]))
        formats.setdefault(label, {})[_describe(decisions[name], stored[name])] = None
    return {label: " / ".join(kinds) for label, kinds in formats.items()}


def _target_dtype(name: str, value: mx.array, dtype: Optional[mx.Dtype]) -> mx.Dtype:
    if not mx.issubdtype(value.dtype, mx.floating):
        return value.dtype
    if recipes.is_tower(name):
        # Encoders overflow float16 (the 26B/31B vision tower reaches > 65504).
        if dtype is not None and dtype != mx.float16:
            return dtype
        return mx.float32 if value.dtype == mx.float16 else value.dtype
    return dtype or value.dtype


def _decisions(source: Source, plan: Optional[recipes.Plan]) -> Dict[str, Optional[recipes.Quant]]:
    """Every weight's quantization (None = float); raises before anything is written."""
    moe = source.model_config.text_config.enable_moe_block
    out = {}
    for name, value in source.tensors.items():
        if plan is None or not name.endswith(".weight"):
            out[name] = None
            continue
        path = name[: -len(".weight")]
        module = source.module(path)
        quantizable = module is not None and hasattr(module, "to_quantized")
        out[name] = recipes.decide(plan, path, tuple(value.shape), quantizable, moe)
    # A layer's three expert stacks are run either all quantized or all float
    # (`mlx_gemma4.moe.Experts`): if one cannot be quantized, none is.
    for name in [n for n in out if n.endswith("switch_glu.gate_proj.weight")]:
        stack = [name.replace("gate_proj", p) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(out.get(n) is None for n in stack):
            out.update(dict.fromkeys(stack))
    return out


def _quantization_config(plan: recipes.Plan, decisions: Dict[str, Optional[recipes.Quant]]) -> dict:
    """The `quantization` block: the body's settings plus one override per module that differs."""
    config: Dict[str, Any] = plan.body.as_dict()
    for name, quant in sorted(decisions.items()):
        if quant is not None and quant != plan.body:
            config[name[: -len(".weight")]] = quant.as_dict()
    return config


def _front_matter(folder: Path) -> Dict[str, str]:
    readme = folder / "README.md"
    text = readme.read_text(errors="replace") if readme.is_file() else ""
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    fields = {}
    for line in (match.group(1).splitlines() if match else []):
        key, sep, value = line.partition(":")
        if sep and value.strip() and not line.startswith((" ", "-")):
            fields[key.strip()] = value.strip()
    return fields


def _copy_aux(source: Path, out: Path) -> None:
    for pattern in _AUX_PATTERNS:
        for file in source.glob(pattern):
            if file.name not in _NOT_COPIED and file.is_file():
                try:
                    shutil.copyfile(file, out / file.name)
                except OSError as e:
                    raise ConvertError(f"cannot copy {file.name} to {out}: {e}") from None


def _write_weights(source: Source, decisions: Dict[str, Optional[recipes.Quant]], out: Path,
                   dtype: Optional[mx.Dtype], max_bytes: int, progress: bool) -> Dict[str, mx.Dtype]:
    """Stream every tensor through cast/quantize into shards; returns each tensor's stored float dtype."""
    writer = ShardWriter(out, max_bytes)
    stored = {}
    names = sorted(source.tensors)
    total = sum(source.tensors[n].nbytes for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for name in names:
            # pop: the source tensor is freed as soon as its output is written.
            value = source.tensors.pop(name)
            size = value.nbytes
            target = _target_dtype(name, value, dtype)
            value = value.astype(target)
            stored[name] = target
            quant = decisions[name]
            if quant is None:
                writer.add({name: value})
            else:
                packed = mx.quantize(value, quant.group_size, quant.bits, mode=quant.mode)
                base = name[: -len(".weight")]
                group = {f"{base}.weight": packed[0], f"{base}.scales": packed[1]}
                if len(packed) > 2:
                    group[f"{base}.biases"] = packed[2]
                writer.add(group)
            del value
            bar.update(size)
    writer.close()
    return stored


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    *,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    recipe: str = "default",
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    dry_run: bool = False,
    revision: Optional[str] = None,
    force: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_BYTES,
    report: bool = True,
    progress: bool = True,
    hub_api: Optional[Any] = None,
    log=print,
) -> ConvertResult:
    """Convert a Gemma 4 checkpoint (HF or MLX layout, local folder or Hub id) to an MLX folder.

    Args:
        hf_path: input folder or Hub repo id. mlx_path: output folder (must not exist unless `force`).
        quantize: quantize with `recipe` at `q_bits`/`q_group_size`/`q_mode` (see `convert.recipes`);
            without it, weights are only cast to `dtype`.
        dtype: "bfloat16", "float16" or "float32" for the text weights (default: keep the input's);
            vision/audio towers never become float16.
        upload_repo: ORG/NAME to upload to afterwards; with `dry_run`, only print what would be uploaded.
        max_shard_size: bytes or "5GB"-style text. report: run the quality report.
        hub_api: an `HfApi`-like object for the upload (tests inject one).
        log: where progress lines go.

    Raises:
        ConvertError: any bad input or failure; the output folder is then left untouched.
    """
    plan = recipes.make_plan(recipe, q_bits, q_group_size, q_mode) if quantize else None
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    try:
        folder = resolve(hf_path, revision)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    check_output_path(out, force, folder)
    if report and not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder}: no tokenizer.json to encode the quality report's prompts; pass --no-report")
    if upload_repo and not dry_run:
        hub.token_for(hub_api, upload_repo)  # fail before converting, not after
    source = open_source(folder)
    decisions = _decisions(source, plan)
    mx_dtype = getattr(mx, dtype) if dtype else None
    config = {k: v for k, v in source.config.items() if k not in ("quantization", "quantization_config")}
    if plan is not None:
        config["quantization"] = _quantization_config(plan, decisions)
        config["quantization_config"] = dict(config["quantization"])

    front = _front_matter(folder)
    is_repo = not Path(str(hf_path)).expanduser().is_dir()
    base_model = front.get("base_model") or (str(hf_path) if is_repo else None)
    shapes = {name: tuple(v.shape) for name, v in source.tensors.items()}
    text_dtype = dtype or _dtype_name(mx_dtype or source.tensors[_EMBEDDING].dtype)
    repo_name = card.suggested_repo(source.model_config, plan, text_dtype, base_model or str(hf_path))
    quality = None
    with atomic_output(out, force) as tmp:
        stored = _write_weights(source, decisions, tmp, mx_dtype, max_bytes, progress)
        write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _copy_aux(folder, tmp)
        if report:
            try:
                quality = quality_report(folder, tmp, tmp)
            except CheckpointError as e:
                raise ConvertError(f"the converted model does not load for the quality report: {e}") from None
            write_text(tmp / "quality.json", json.dumps(quality, indent=2) + "\n")
            log(format_report(quality))
        info = card.CardInfo(
            base_model=base_model, model_config=source.model_config, plan=plan,
            dtype=text_dtype, decisions=_card_table(decisions, shapes, stored),
            disk_bytes=sum(f.stat().st_size for f in tmp.glob("*.safetensors")), version=mlx_gemma4.__version__,
            quality=quality, license=front.get("license", "apache-2.0"), repo_id=upload_repo or repo_name,
        )
        write_text(tmp / "README.md", card.model_card(info))
    log(f"wrote {out}")
    result = ConvertResult(out, quality, repo_name)
    if dry_run:
        log(f"suggested repo name: {repo_name}")
        log(hub.dry_run_text(out, upload_repo or repo_name))
    elif upload_repo:
        result.uploaded_to = hub.upload(out, upload_repo, api=hub_api)
        log(f"uploaded to {result.uploaded_to}")
    return result
