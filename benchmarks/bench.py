#!/usr/bin/env python
"""Benchmark the Gemma 4 text decoder with random weights in the real geometry
of Gemma 4 E2B and 26B-A4B.

For each geometry a random bfloat16 checkpoint (HF-style folder: config.json,
sharded safetensors, index) is built once and cached under `benchmarks/.cache/`.
It is then loaded with `mlx_gemma4.loader.load_model` in each requested
activation dtype and timed: load, time to first token for each prompt length,
greedy decode speed, peak memory, and the weight bytes a decode step reads.

    python benchmarks/bench.py                 # e2b + 26b-a4b, float32
    python benchmarks/bench.py --quick         # CI smoke run
    python benchmarks/bench.py --geometry e2b --layers 12 --dtype float32 bfloat16 --json out.json

See benchmarks/README.md for the options and what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mlx_gemma4.config import FULL, SLIDING, ModelConfig  # noqa: E402
from mlx_gemma4.loader import load_model  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402

GB = 1e9
SHARD_BYTES = 2 * 10**9
# Largest number of random values generated at once while filling a tensor.
CHUNK_ELEMENTS = 1 << 27
WEIGHT_STD = 0.02

# The text_config fields of the released google/gemma-4-E2B-it and
# gemma-4-26B-A4B-it config.json files (unused training-only fields dropped;
# layer_types is rebuilt from the period of the full-attention layers).
_ROPE = {
    FULL: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
    SLIDING: {"rope_theta": 10000.0, "rope_type": "default"},
}
_COMMON = {
    "model_type": "gemma4_text",
    "attention_bias": False,
    "final_logit_softcapping": 30.0,
    "global_head_dim": 512,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "rope_parameters": _ROPE,
    "tie_word_embeddings": True,
    "vocab_size": 262144,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "dtype": "bfloat16",
}
GEOMETRIES: Dict[str, Tuple[dict, int]] = {
    # name: (text_config without layer_types, period of full-attention layers)
    "e2b": (
        {
            **_COMMON,
            "attention_k_eq_v": False,
            "enable_moe_block": False,
            "hidden_size": 1536,
            "hidden_size_per_layer_input": 256,
            "intermediate_size": 6144,
            "max_position_embeddings": 131072,
            "num_attention_heads": 8,
            "num_global_key_value_heads": None,
            "num_hidden_layers": 35,
            "num_key_value_heads": 1,
            "num_kv_shared_layers": 20,
            "sliding_window": 512,
            "use_double_wide_mlp": True,
            "vocab_size_per_layer_input": 262144,
        },
        5,
    ),
    "26b-a4b": (
        {
            **_COMMON,
            "attention_k_eq_v": True,
            "enable_moe_block": True,
            "hidden_size": 2816,
            "hidden_size_per_layer_input": 0,
            "intermediate_size": 2112,
            "max_position_embeddings": 262144,
            "moe_intermediate_size": 704,
            "num_attention_heads": 16,
            "num_experts": 128,
            "num_global_key_value_heads": 2,
            "num_hidden_layers": 30,
            "num_key_value_heads": 8,
            "num_kv_shared_layers": 0,
            "sliding_window": 1024,
            "top_k_experts": 8,
            "use_bidirectional_attention": "vision",
            "use_double_wide_mlp": False,
        },
        6,
    ),
}
DEFAULT_LAYERS = {"e2b": 10, "26b-a4b": 4}
QUICK_LAYERS = {"e2b": 6, "26b-a4b": 1}
DEFAULTS = {"prompt_lengths": [32, 512], "decode_tokens": 16}
QUICK = {"prompt_lengths": [16], "decode_tokens": 4}


# ---------------------------------------------------------------------------
# Geometry and random checkpoint


def real_text_config(geometry: str) -> dict:
    """The released text_config of `geometry`, all layers."""
    text, period = GEOMETRIES[geometry]
    n = text["num_hidden_layers"]
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]
    return {**text, "layer_types": types}


def cut_layers(text: dict, n: int) -> dict:
    """`text` with only its first `n` layers.

    The last layer is made full attention (as Gemma 4 requires) and
    `num_kv_shared_layers` shrinks in proportion, but leaves at least one
    K/V-owning layer of each attention type so that sharing still works.
    """
    full_n = text["num_hidden_layers"]
    if not 1 <= n <= full_n:
        raise ValueError(f"--layers must be in [1, {full_n}], got {n}")
    types = text["layer_types"][:n]
    types[-1] = FULL
    owners_needed = max(types.index(t) for t in set(types)) + 1
    shared = min(round(text["num_kv_shared_layers"] * n / full_n), n - owners_needed)
    return {**text, "num_hidden_layers": n, "layer_types": types, "num_kv_shared_layers": shared}


def checkpoint_config(text: dict) -> dict:
    """A text-only `config.json` (no encoders) around `text`."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": None,
        "audio_config": None,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "dtype": "bfloat16",
    }


def parameter_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """MLX parameter names and shapes of the model `config` describes.

    The model is built but never evaluated, so no weight memory is allocated.
    """
    model = Model(ModelConfig.from_dict(config))
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def random_tensor(shape: Tuple[int, ...]) -> mx.array:
    """A bfloat16 weight: ones for 1-D tensors (norm weights, scales,
    `layer_scalar`), else normal with std `WEIGHT_STD`.

    Large tensors are filled in place, `CHUNK_ELEMENTS` at a time along
    axis 0, so the temporaries of the generator stay small.
    """
    if len(shape) == 1:
        return mx.ones(shape, dtype=mx.bfloat16)
    step = max(1, CHUNK_ELEMENTS // math.prod(shape[1:]))
    if step >= shape[0]:
        return mx.random.normal(shape, dtype=mx.bfloat16, scale=WEIGHT_STD)
    out = mx.zeros(shape, dtype=mx.bfloat16)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        out[start:stop] = mx.random.normal((stop - start, *shape[1:]), dtype=mx.bfloat16, scale=WEIGHT_STD)
        mx.eval(out)
    return out


def plan_shards(shapes: Dict[str, Tuple[int, ...]]) -> List[List[str]]:
    """Group tensor names into shards of at most `SHARD_BYTES` of bfloat16
    (a tensor larger than that gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def build_checkpoint(folder: Path, config: dict, seed: int,
                     make_tensor: Optional[Callable[[str, Tuple[int, ...]], mx.array]] = None) -> None:
    """Write a random bfloat16 checkpoint for `config` into `folder`
    (`make_tensor(name, shape)` draws each tensor; default `random_tensor`).

    Built in a temporary sibling folder and renamed at the end, so an
    interrupted build never leaves a folder that looks complete.
    """
    make_tensor = make_tensor or (lambda name, shape: random_tensor(shape))
    shapes = parameter_shapes(config)
    shards = plan_shards(shapes)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mx.random.seed(seed)
    weight_map: Dict[str, str] = {}
    total = 0
    start = time.perf_counter()
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = make_tensor(name, shapes[name])
            mx.eval(tensors[name])
        mx.save_safetensors(str(partial / file), tensors, metadata={"format": "mlx"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
        mx.clear_cache()
        log(f"  {file}: {total / GB:.2f} GB written, {time.perf_counter() - start:.0f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(folder)


def ensure_checkpoint(cache_dir: Path, geometry: str, layers: int, seed: int) -> Path:
    """The cached checkpoint folder for `geometry` cut to `layers`, built if missing.

    The folder name carries a hash of the config and seed, so a changed
    geometry never reuses stale weights.
    """
    config = checkpoint_config(cut_layers(real_text_config(geometry), layers))
    return cached_build(cache_dir / f"{geometry}-{layers}L", [config, seed, WEIGHT_STD],
                        lambda folder: build_checkpoint(folder, config, seed))


def cached_build(stem: Path, key: list, build: Callable[[Path], None]) -> Path:
    """`stem`-<hash of key>, built by `build(folder)` unless it already exists."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = stem.with_name(f"{stem.name}-{digest}")
    if not folder.is_dir():
        log(f"building random checkpoint {folder}")
        start = time.perf_counter()
        build(folder)
        log(f"  built in {time.perf_counter() - start:.0f} s")
    return folder


# ---------------------------------------------------------------------------
# Measurements


@dataclass
class PromptResult:
    tokens: int
    ttft_s: float  # prompt in, first greedy token out
    prefill_tok_s: float  # tokens / ttft_s


@dataclass
class Result:
    geometry: str
    layers: int
    kv_shared_layers: int
    dtype: str
    params_b: float
    weights_gb: float
    load_s: float
    load_peak_gb: float
    prompts: List[PromptResult] = field(default_factory=list)
    decode_context: int = 0
    decode_tokens: int = 0
    decode_tok_s: float = 0.0
    read_gb_per_token: float = 0.0
    decode_gb_s: float = 0.0
    run_peak_gb: float = 0.0
    load_average: float = 0.0  # 1-minute load average of the machine at the end (other processes)


def decode_bytes_per_token(model: Model) -> int:
    """Weight bytes one decode step reads.

    Every parameter, except: the PLE table (one row read), the input
    embedding when untied (one row; tied, it is also the LM head and is read
    whole), and the expert stacks (only top_k of num_experts). KV-cache reads
    are not counted.
    """
    text = model.config.text_config
    total = 0
    for name, p in tree_flatten(model.parameters()):
        nbytes = p.nbytes
        if name.endswith("embed_tokens_per_layer.weight") or (
            name.endswith("embed_tokens.weight") and not text.tie_word_embeddings
        ):
            nbytes //= p.shape[0]
        elif ".experts." in name:
            nbytes = nbytes * text.top_k_experts // text.num_experts
        total += nbytes
    return total


def first_token(model: Model, prompt: mx.array, chunk: int) -> Tuple[mx.array, list]:
    """Prefill `prompt` ([T] int32) and return the greedy next token and the cache.

    Like mlx-lm's generate: all but the last token go through the cache in
    chunks of `chunk`, evaluating only the cache state (so no LM head and no
    KV-shared layer runs for them); the last token yields the logits.
    """
    cache = model.make_cache()
    for start in range(0, prompt.size - 1, chunk):
        model(prompt[None, start : min(start + chunk, prompt.size - 1)], cache)
        mx.eval([c.state for c in cache])
    logits = model(prompt[None, -1:], cache)[:, -1]
    token = mx.argmax(logits, axis=-1)
    finite = mx.all(mx.isfinite(logits))
    mx.eval(token, finite)
    check_finite(finite)
    return token, cache


def decode(model: Model, token: mx.array, cache: list, n: int) -> None:
    """`n` greedy steps, one token at a time, each evaluated before the next."""
    finite = mx.array(True)
    for _ in range(n):
        logits = model(token[None], cache)[:, -1]
        token = mx.argmax(logits, axis=-1)
        finite = finite & mx.all(mx.isfinite(logits))
        mx.eval(token, finite)
    check_finite(finite)


def check_finite(finite: mx.array) -> None:
    """Random weights that blow up the activations make the timings meaningless."""
    if not finite.item():
        raise FloatingPointError("non-finite logits: the random weights overflow the activations")


def random_prompt(length: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (length,), dtype=mx.int32, key=mx.random.key(seed + length))


def load(folder: Path, dtype: str) -> Model:
    """`load_model` lazily, then evaluate the parameters one at a time, largest first.

    `load_model(lazy=False)` evaluates all parameters in one `mx.eval`; when it
    also casts (bfloat16 checkpoint to float32) the CPU backend then holds most
    bfloat16 tensors and their float32 copies at once, which does not fit for
    the larger geometries (see RESULTS.md). One at a time, the peak stays near
    the size of the loaded weights.
    """
    model = load_model(folder, dtype=getattr(mx, dtype), lazy=True, text_only=True)
    for _, p in sorted(tree_flatten(model.parameters()), key=lambda item: -item[1].nbytes):
        mx.eval(p)
    return model


def benchmark(
    folder: Path,
    geometry: str,
    dtype: str,
    prompt_lengths: Sequence[int],
    decode_tokens: int,
    chunk: int,
    seed: int,
) -> Result:
    """Load `folder` in `dtype` and time prompts of `prompt_lengths` and a
    greedy decode of `decode_tokens` continuing the longest prompt."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    model = load(folder, dtype)
    load_s = time.perf_counter() - start
    text = model.config.text_config
    params = tree_flatten(model.parameters())
    result = Result(
        geometry=geometry,
        layers=text.num_hidden_layers,
        kv_shared_layers=text.num_kv_shared_layers,
        dtype=dtype,
        params_b=sum(p.size for _, p in params) / 1e9,
        weights_gb=sum(p.nbytes for _, p in params) / GB,
        load_s=load_s,
        load_peak_gb=mx.get_peak_memory() / GB,
    )
    log(f"{geometry} {dtype}: loaded in {load_s:.1f} s")

    mx.reset_peak_memory()
    token, cache = first_token(model, random_prompt(4, text.vocab_size, seed), chunk)  # warm-up
    decode(model, token, cache, 1)
    for length in sorted(prompt_lengths):
        prompt = random_prompt(length, text.vocab_size, seed)
        start = time.perf_counter()
        token, cache = first_token(model, prompt, chunk)
        ttft = time.perf_counter() - start
        result.prompts.append(PromptResult(length, ttft, length / ttft))
        log(f"  prompt {length}: first token in {ttft:.2f} s")

    start = time.perf_counter()
    decode(model, token, cache, decode_tokens)
    elapsed = time.perf_counter() - start
    result.decode_context = max(prompt_lengths)
    result.decode_tokens = decode_tokens
    result.decode_tok_s = decode_tokens / elapsed
    result.read_gb_per_token = decode_bytes_per_token(model) / GB
    result.decode_gb_s = result.read_gb_per_token * result.decode_tok_s
    result.run_peak_gb = mx.get_peak_memory() / GB
    result.load_average = os.getloadavg()[0]
    log(f"  decode: {result.decode_tok_s:.2f} tok/s")
    return result


# ---------------------------------------------------------------------------
# Reporting and command line


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per (geometry, dtype)."""
    lengths = sorted({p.tokens for r in results for p in r.prompts})
    header = ["geometry", "layers (shared)", "dtype", "params B", "weights GB", "load s"]
    header += [f"TTFT {n} s (tok/s)" for n in lengths]
    header += ["decode tok/s", "GB read/token", "GB/s", "peak GB load / run"]
    rows = [header, ["---"] * len(header)]
    for r in results:
        by_length = {p.tokens: p for p in r.prompts}
        row = [r.geometry, f"{r.layers} ({r.kv_shared_layers})", r.dtype, f"{r.params_b:.2f}",
               f"{r.weights_gb:.2f}", f"{r.load_s:.1f}"]
        row += [f"{by_length[n].ttft_s:.2f} ({by_length[n].prefill_tok_s:.1f})" if n in by_length else "-"
                for n in lengths]
        row += [f"{r.decode_tok_s:.2f}", f"{r.read_gb_per_token:.2f}", f"{r.decode_gb_s:.1f}",
                f"{r.load_peak_gb:.1f} / {r.run_peak_gb:.1f}"]
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES),
                        help="geometries to run (default: all)")
    parser.add_argument("--layers", type=int,
                        help=f"decoder layers of every geometry (default: {DEFAULT_LAYERS}; --quick: {QUICK_LAYERS})")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                        help="activation/weight dtypes to load in (default: float32)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+",
                        help=f"prompt lengths in tokens (default: {DEFAULTS['prompt_lengths']})")
    parser.add_argument("--decode-tokens", type=int,
                        help=f"greedy tokens to decode (default: {DEFAULTS['decode_tokens']})")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk size (default: 512)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for CI: layers {QUICK_LAYERS}, prompts {QUICK['prompt_lengths']}, "
                        f"{QUICK['decode_tokens']} decode tokens")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache",
                        help="where random checkpoints are kept (default: benchmarks/.cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.prompt_lengths) < 1 or args.decode_tokens < 1 or args.prefill_chunk < 1:
        parser.error("prompt lengths, --decode-tokens and --prefill-chunk must be >= 1")
    return args


def machine() -> Dict[str, str]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "cpu": cpu, "cpus": str(os.cpu_count()), "ram_gb": f"{ram / GB:.1f}",
            "mlx": mx.__version__, "device": str(mx.default_device()),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    layer_defaults = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    results = []
    for geometry in args.geometry:
        layers = args.layers or layer_defaults[geometry]
        folder = ensure_checkpoint(args.cache_dir, geometry, layers, args.seed)
        for dtype in args.dtype:
            results.append(benchmark(folder, geometry, dtype, args.prompt_lengths, args.decode_tokens,
                                     args.prefill_chunk, args.seed))
    print(format_table(results))
    if args.json:
        payload = {"machine": machine(), "argv": sys.argv, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
