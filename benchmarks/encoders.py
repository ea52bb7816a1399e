#!/usr/bin/env python
"""Benchmark the Gemma 4 vision and audio encoders of mlx_gemma4 against mlx-vlm's,
with random weights in the real encoder geometry of Gemma 4 E2B and 26B-A4B.

For each geometry a random bfloat16 checkpoint (config.json from the released
model, text decoder cut to one layer, sharded safetensors in mlx_gemma4's key
names, which mlx-vlm's loader also accepts) is built once and cached under
`benchmarks/.cache/`. Both implementations load it in float32 and encode the
same preprocessed inputs (our ImageProcessor / AudioFeatureExtractor): time,
peak memory, and the largest difference between their outputs.

    python benchmarks/encoders.py                       # all budgets, 5 s and 30 s audio
    python benchmarks/encoders.py --quick               # smoke run, < 2 min
    python benchmarks/encoders.py --vision-layers 2 --budgets 70 280 --json out.json

See benchmarks/README.md for the options and what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checkpoints.py, next to this file
from checkpoints import GB, REFERENCE_CONFIGS, ROOT, build_checkpoint, cached_build, cut_layers, log, machine, \
    parameter_shapes, random_tensor, real_text_config  # noqa: E402
from mlx_gemma4.audio import valid_rows  # noqa: E402
from mlx_gemma4.audio_features import AudioFeatureExtractor  # noqa: E402
from mlx_gemma4.image_processing import SUPPORTED_BUDGETS, ImageProcessor  # noqa: E402
from mlx_gemma4.loader import load_model  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402
from mlx_vlm.utils import load_model as vlm_load_model  # noqa: E402

CONFIG_FILES = {"e2b": "gemma-4-E2B-it.json", "26b-a4b": "gemma-4-26B-A4B-it.json"}
PROCESSOR_FILE = "processor_config.E2B-E4B.json"  # the 26B-A4B image processor has the same settings
TEXT_LAYERS = 1
TOWERS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
# Finite clip bounds of the ClippableLinear scalars: real checkpoints store finite values; these never bind.
CLIP_BOUND = 1.0e4
IMAGE_SIZE = (896, 1344)  # height, width of the synthetic test image
SAMPLING_RATE = 16_000
DEFAULTS = {"budgets": list(SUPPORTED_BUDGETS), "audio_seconds": [5.0, 30.0], "reps": 2}
QUICK = {"budgets": [70], "audio_seconds": [5.0], "reps": 1, "vision_layers": 2, "audio_layers": 2}


# ---------------------------------------------------------------------------
# Random checkpoint with the released encoder geometry


def checkpoint_config(geometry: str, config_dir: Path, vision_layers: Optional[int],
                      audio_layers: Optional[int]) -> dict:
    """The released config.json of `geometry`, text decoder cut to `TEXT_LAYERS` layers
    and, when given, the vision / audio encoders cut to their first N layers."""
    config = json.loads((config_dir / CONFIG_FILES[geometry]).read_text())
    config["text_config"] = cut_layers(real_text_config(geometry), TEXT_LAYERS)
    for key, layers in (("vision_config", vision_layers), ("audio_config", audio_layers)):
        if config.get(key) is not None and layers is not None:
            full = config[key]["num_hidden_layers"]
            if not 1 <= layers <= full:
                raise ValueError(f"{key}: layers must be in [1, {full}], got {layers}")
            config[key] = {**config[key], "num_hidden_layers": layers}
    return config


def random_weight(name: str, shape: Tuple[int, ...]) -> mx.array:
    """checkpoints.py's random bfloat16 weight; the 0-d ClippableLinear bounds get ±`CLIP_BOUND`."""
    if not shape:
        return mx.array(-CLIP_BOUND if name.endswith("_min") else CLIP_BOUND, dtype=mx.bfloat16)
    return random_tensor(shape)


def ensure_checkpoint(cache_dir: Path, geometry: str, config: dict, seed: int) -> Path:
    """The cached checkpoint folder for `config`, built if missing (named by a hash of config and seed)."""
    return cached_build(cache_dir / f"encoders-{geometry}", [config, seed, CLIP_BOUND],
                        lambda folder: build_checkpoint(folder, config, seed, random_weight))


# ---------------------------------------------------------------------------
# Inputs


@dataclass
class ImageInput:
    budget: int
    pixel_values: np.ndarray  # float32 [images, patches, 3 * patch_size**2]
    position_ids: np.ndarray  # int32 [images, patches, 2]

    @property
    def label(self) -> str:
        count = self.pixel_values.shape[0]
        return f"image {self.budget}" if count == 1 else f"{count} images {self.budget}"


@dataclass
class AudioInput:
    seconds: float
    features: np.ndarray  # float32 [1, frames, mels]
    mask: np.ndarray  # bool [1, frames], True on real frames


def synthetic_image(seed: int) -> np.ndarray:
    """A uint8 RGB test image: smooth gradients plus noise (content does not affect the timings)."""
    height, width = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    noise = np.random.default_rng(seed).integers(0, 56, (height, width, 3))
    return (base + noise).astype(np.uint8)


def image_inputs(config_dir: Path, budgets: Sequence[int], seed: int, count: int) -> List[ImageInput]:
    """`count` synthetic images (distinct, so none is a cache hit) processed
    together by our ImageProcessor at each budget."""
    processor_config = json.loads((config_dir / PROCESSOR_FILE).read_text())["image_processor"]
    processor = ImageProcessor.from_dict(processor_config)
    images = [synthetic_image(seed + i) for i in range(count)]
    inputs = []
    for budget in budgets:
        processed = processor(images, max_soft_tokens=budget)
        inputs.append(ImageInput(budget, processed.pixel_values, processed.position_ids))
    return inputs


def warmup_image(image: ImageInput, pooling_kernel_size: int) -> ImageInput:
    """The top-left k×k patch block of `image`: a valid one-token image for a cheap warm-up call."""
    columns, rows = image.position_ids[0, :, 0], image.position_ids[0, :, 1]
    keep = np.flatnonzero((columns >= 0) & (columns < pooling_kernel_size) & (rows >= 0) &
                          (rows < pooling_kernel_size))
    return ImageInput(image.budget, image.pixel_values[:, keep], image.position_ids[:, keep])


def audio_input(seconds: float, seed: int) -> AudioInput:
    """Log-mel features (our AudioFeatureExtractor) of a synthetic clip: a rising tone plus noise."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t) + 0.05 * rng.standard_normal(t.size)
    features, mask = AudioFeatureExtractor()([wave.astype(np.float32)])
    return AudioInput(seconds, features, mask)


# ---------------------------------------------------------------------------
# The two implementations


def load_ours(folder: Path) -> Model:
    """mlx_gemma4's model in float32; only the encoder weights are read (the text decoder stays lazy)."""
    model = load_model(folder, dtype=mx.float32, lazy=True)
    for name in TOWERS:
        if name in model:
            mx.eval(model[name].parameters())
    return model


def load_vlm(folder: Path) -> nn.Module:
    """mlx-vlm's model (`mlx_vlm.utils.load_model`), encoders cast to float32 and read."""
    model = vlm_load_model(folder, lazy=True)
    for name in TOWERS:
        module = getattr(model, name, None)
        if module is not None:
            module.set_dtype(mx.float32)
            mx.eval(module.parameters())
    return model


def encoder_weights_gb(config: dict) -> float:
    """Float32 size of the encoder weights (vision + audio towers and their projections) of `config`."""
    shapes = parameter_shapes(config)
    return sum(4 * int(np.prod(shape)) for name, shape in shapes.items() if name.startswith(TOWERS)) / GB


def ours_image(model: Model, image: ImageInput) -> mx.array:
    """Soft-token embeddings `[tokens, text_hidden]` through `Model.encode_vision` (its cache cleared first)."""
    model.encoder_outputs.clear()
    return model.encode_vision(mx.array(image.pixel_values), mx.array(image.position_ids))


def vlm_image(model: nn.Module, image: ImageInput) -> mx.array:
    """Soft-token embeddings `[tokens, text_hidden]` through mlx-vlm's `encode_image` (same patches, positions;
    the synthetic images have one size, so its batch has no padding tokens)."""
    features = model.encode_image(mx.array(image.pixel_values), mx.array(image.position_ids))
    return features.reshape(-1, features.shape[-1])


def ours_audio(model: Model, audio: AudioInput) -> mx.array:
    """Soft-token embeddings of the real frames through `Model.encode_audio` (its cache cleared first)."""
    model.encoder_outputs.clear()
    return model.encode_audio(mx.array(audio.features), mx.array(audio.mask))


def vlm_audio(model: nn.Module, audio: AudioInput) -> mx.array:
    """mlx-vlm's `audio_tower` + `embed_audio` (its mask is True on padding), padding rows dropped."""
    states, padding = model.audio_tower(mx.array(audio.features), mx.array(~audio.mask))
    embedded = model.embed_audio(states)
    mx.eval(embedded, padding)
    return valid_rows(embedded, ~padding)


# ---------------------------------------------------------------------------
# Measurements


@dataclass
class Timing:
    seconds: float  # fastest of the repetitions
    peak_gb: float  # mx.get_peak_memory() during the call, encoder weights included
    output: np.ndarray


def measure(encode: Callable[[], mx.array], reps: int) -> Timing:
    """Run `encode` `reps` times, evaluating its output each time; the fastest time and the highest peak."""
    best, peak, output = float("inf"), 0.0, None
    for _ in range(reps):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        result = encode()
        mx.eval(result)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, mx.get_peak_memory() / GB)
        output = np.array(result.astype(mx.float32))
        del result
    return Timing(best, peak, output)


def attention_gb(image: ImageInput, heads: int) -> float:
    """Transient attention memory of mlx-vlm at `image`'s patch count: one float32 score matrix per head and
    image, plus its float mask and their boolean precursor (the CPU backend does not tile attention)."""
    count, patches = image.pixel_values.shape[:2]
    return count * (heads + 2) * patches**2 * 4 / GB


@dataclass
class Row:
    geometry: str
    encoder: str  # "vision" or "audio"
    layers: int
    input: str
    soft_tokens: int
    ours_s: float
    vlm_s: float
    ours_peak_gb: float
    vlm_peak_gb: float
    max_abs_diff_rel: float  # max |ours - mlx-vlm| / max |mlx-vlm|
    audio_seconds: float = 0.0


def relative_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs| (inf when the shapes differ)."""
    if ours.shape != theirs.shape:
        log(f"  output shapes differ: ours {ours.shape}, mlx-vlm {theirs.shape}")
        return float("inf")
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def run_geometry(folder: Path, geometry: str, budgets: Sequence[int], audio_seconds: Sequence[float],
                 reps: int, max_gb: float, config_dir: Path, seed: int, count: int) -> List[Row]:
    """Time every input on ours, then (ours freed) on mlx-vlm, and compare the outputs."""
    config = json.loads((folder / "config.json").read_text())
    vision, audio = config["vision_config"], config.get("audio_config")
    images = image_inputs(config_dir, budgets, seed, count)
    clips = [audio_input(s, seed) for s in audio_seconds] if audio else []
    warm_image = warmup_image(images[0], vision["pooling_kernel_size"])
    warm_clip = audio_input(0.5, seed) if audio else None

    weights_gb = encoder_weights_gb(config)
    fits = [i for i in images if weights_gb + attention_gb(i, vision["num_attention_heads"]) <= max_gb]
    for image in images:
        if image not in fits:
            log(f"{geometry} {image.label}: skipped, estimated peak above --max-gb {max_gb:g}")
    results: Dict[str, Dict[str, Timing]] = {"ours": {}, "mlx-vlm": {}}
    loaders = (("ours", load_ours, ours_image, ours_audio), ("mlx-vlm", load_vlm, vlm_image, vlm_audio))
    for name, loader, encode_image, encode_audio in loaders:
        gc.collect()
        mx.clear_cache()
        model = loader(folder)
        log(f"{geometry} {name}: loaded, encoder weights {weights_gb:.2f} GB (float32)")
        measure(lambda: encode_image(model, warm_image), 1)
        for image in fits:
            results[name][image.label] = timing = measure(lambda: encode_image(model, image), reps)
            log(f"  {image.label}: {timing.seconds:.2f} s, peak {timing.peak_gb:.2f} GB")
        if clips:
            measure(lambda: encode_audio(model, warm_clip), 1)
        for clip in clips:
            results[name][f"audio {clip.seconds:g} s"] = timing = measure(lambda: encode_audio(model, clip), reps)
            log(f"  audio {clip.seconds:g} s: {timing.seconds:.2f} s, peak {timing.peak_gb:.2f} GB")
        model = None  # free it before the next runtime loads

    rows = []
    for key, ours in results["ours"].items():
        theirs = results["mlx-vlm"][key]
        is_audio = key.startswith("audio")
        rows.append(Row(
            geometry=geometry,
            encoder="audio" if is_audio else "vision",
            layers=(audio if is_audio else vision)["num_hidden_layers"],
            input=key,
            soft_tokens=ours.output.shape[0],
            ours_s=ours.seconds,
            vlm_s=theirs.seconds,
            ours_peak_gb=ours.peak_gb,
            vlm_peak_gb=theirs.peak_gb,
            max_abs_diff_rel=relative_diff(ours.output, theirs.output),
            audio_seconds=float(key.split()[1]) if is_audio else 0.0,
        ))
    return rows


# ---------------------------------------------------------------------------
# Reporting and command line


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table, one row per (geometry, input)."""
    header = ["geometry", "encoder (layers)", "input", "soft tokens", "ours s", "mlx-vlm s", "ours / mlx-vlm",
              "s per audio s (ours / mlx-vlm)", "peak GB (ours / mlx-vlm)", "max |Δ| / max |ref|"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        per_second = f"{r.ours_s / r.audio_seconds:.3f} / {r.vlm_s / r.audio_seconds:.3f}" if r.audio_seconds else "-"
        lines.append([r.geometry, f"{r.encoder} ({r.layers})", r.input, str(r.soft_tokens), f"{r.ours_s:.2f}",
                      f"{r.vlm_s:.2f}", f"{r.ours_s / r.vlm_s:.2f}", per_second,
                      f"{r.ours_peak_gb:.2f} / {r.vlm_peak_gb:.2f}", f"{r.max_abs_diff_rel:.1e}"])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", choices=list(CONFIG_FILES), default=list(CONFIG_FILES),
                        help="geometries to run (default: all)")
    parser.add_argument("--budgets", type=int, nargs="+", choices=SUPPORTED_BUDGETS,
                        help=f"image soft-token budgets (default: {DEFAULTS['budgets']}; --quick: {QUICK['budgets']})")
    parser.add_argument("--audio-seconds", type=float, nargs="+",
                        help=f"audio clip lengths, at most 30 (default: {DEFAULTS['audio_seconds']})")
    parser.add_argument("--images", type=int, default=1,
                        help="distinct images per budget, encoded together as one prompt's (default: 1)")
    parser.add_argument("--reps", type=int, help=f"timed repetitions, fastest kept (default: {DEFAULTS['reps']})")
    parser.add_argument("--vision-layers", type=int,
                        help=f"keep only the first N vision encoder layers (default: all; --quick: "
                        f"{QUICK['vision_layers']})")
    parser.add_argument("--audio-layers", type=int,
                        help=f"keep only the first N audio encoder layers (default: all; --quick: "
                        f"{QUICK['audio_layers']})")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="skip image budgets whose estimated peak memory exceeds this (default: 6)")
    parser.add_argument("--quick", action="store_true", help="smoke run: budget 70, 5 s audio, 1 rep, 2 layers")
    parser.add_argument("--config-dir", type=Path, default=REFERENCE_CONFIGS,
                        help=f"released config.json files (default: {REFERENCE_CONFIGS})")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache",
                        help="where random checkpoints are kept (default: benchmarks/.cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    preset = {**DEFAULTS, **QUICK} if args.quick else {**DEFAULTS, "vision_layers": None, "audio_layers": None}
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reps < 1 or args.images < 1 or not all(0 < s <= 30 for s in args.audio_seconds):
        parser.error("--reps and --images must be >= 1 and audio lengths in (0, 30] seconds")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    rows: List[Row] = []
    for geometry in args.geometry:
        config = checkpoint_config(geometry, args.config_dir, args.vision_layers, args.audio_layers)
        folder = ensure_checkpoint(args.cache_dir, geometry, config, args.seed)
        rows += run_geometry(folder, geometry, sorted(args.budgets), args.audio_seconds, args.reps, args.max_gb,
                             args.config_dir, args.seed, args.images)
    print(format_table(rows))
    if args.json:
        payload = {"machine": machine(), "argv": sys.argv, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
