#!/usr/bin/env python
"""Benchmark text generation, mlx_gemma4 against mlx-vlm, on the same 4-bit checkpoint.

For each geometry (random weights, real Gemma 4 widths, fewer layers) a
bfloat16 checkpoint is built once (`checkpoints.py`) and converted once with
our converter (`convert`, cached next to it). In ONE run, both runtimes load
that converted folder and generate greedily through their own public loops
(`mlx_gemma4.generate.generate_tokens`, `mlx_vlm.generate.generate_step`) on
the same random prompts: load time, time to first token per prompt length,
decode tokens/s, peak memory, the ratio of each, and decode as a share of the
machine's measured memory bandwidth (weights + KV cache read per token).

    python benchmarks/bench.py                 # e2b (10 layers), 26b-a4b (4), 31b (2), 4-bit
    python benchmarks/bench.py --quick         # CI smoke run
    python benchmarks/bench.py --geometry e2b --long-context 8192 --follow-up-tokens 32 --json out.json

See benchmarks/README.md for the options and what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import GB, GEOMETRIES, ROOT, cached_build, ensure_checkpoint, log, machine, mlx_vlm_view  # noqa: E402,E501

from convert import convert  # noqa: E402
from mlx_gemma4 import precision  # noqa: E402
from mlx_gemma4.cache import KV_BITS  # noqa: E402
from mlx_gemma4.config import ModelConfig, TextConfig  # noqa: E402
from mlx_gemma4.generate import generate_tokens  # noqa: E402
from mlx_gemma4.loader import load_model, read_config  # noqa: E402

DEFAULT_LAYERS = {"e2b": 10, "26b-a4b": 4, "31b": 2}
# The CI smoke run leaves out 31B: its dense path is E2B's, its K=V attention 26B-A4B's.
QUICK_LAYERS = {"e2b": 6, "26b-a4b": 1}
DEFAULTS = {"prompt_lengths": [32, 128], "decode_tokens": 8}
QUICK = {"prompt_lengths": [16], "decode_tokens": 3}
RUNTIMES = ("mlx_gemma4", "mlx_vlm")


# ---------------------------------------------------------------------------
# The two runtimes, behind one interface


@dataclass
class Runtime:
    """How to load a converted folder and stream greedy tokens with one runtime."""

    name: str
    load: Callable[[Path], object]
    # (model, prompt ids [T], max tokens, prefill chunk, caches or None) -> greedy (token, logprobs) pairs
    stream: Callable[..., Iterator[tuple]]
    # (model, kv_bits, fill) -> the caches of the K/V-owning layers (in layer order) after `fill(caches)`,
    # the global layers' quantized to kv_bits (when not None)
    filled_caches: Callable[[object, Optional[int], Callable[[list], None]], list]
    kv_dtype: mx.Dtype  # of the cached keys and values
    # Why quantized caches cannot run on a model (None: they can)
    no_quantized_caches: Callable[[TextConfig], Optional[str]] = lambda text: None


def ours(dtype: Optional[str]) -> Runtime:
    def load(folder: Path):
        return load_model(folder, dtype=dtype, text_only=True)  # evaluates one tensor at a time

    def stream(model, prompt, n, chunk, cache=None):
        return islice(generate_tokens(model, prompt, cache=cache, prefill_step_size=chunk), n)

    def filled_caches(model, kv_bits, fill):
        cache = model.make_cache(kv_bits=kv_bits, quantized_kv_start=0)
        fill(cache)
        return cache

    return Runtime("mlx_gemma4", load, stream, filled_caches, precision.compute_dtype(dtype, mx.bfloat16))


def mlx_vlm() -> Runtime:
    from mlx_vlm.generate import generate_step
    from mlx_vlm.utils import load_model as vlm_load_model

    def load(folder: Path):
        return vlm_load_model(folder, lazy=False)

    def stream(model, prompt, n, chunk, cache=None):
        steps = generate_step(prompt[None], model, None, None, max_tokens=n, temperature=0.0,
                              prefill_step_size=chunk, prompt_cache=cache)
        return ((int(token), logprobs) for token, logprobs in steps)

    def filled_caches(model, kv_bits, fill):
        from mlx_vlm.models.cache import KVCache

        cache = model.language_model.make_cache()
        fill(cache)
        # Its own `generate_step(kv_bits=...)` cannot run on Gemma 4: it converts every cache, and a sliding
        # layer's RotatingKVCache raises NotImplementedError (mlx-lm issue 1573). Its global layers' caches
        # convert, and its attention then reads them quantized, as ours.
        return [c.to_quantized(group_size=64, bits=kv_bits) if kv_bits and isinstance(c, KVCache) else c
                for c in cache]

    def no_quantized_caches(text):
        if text.num_kv_shared_layers:
            return "its KV-shared layers pass the quantized keys to the float attention kernel (a TypeError)"
        return None

    # bfloat16 caches, as shipped
    return Runtime("mlx_vlm", load, stream, filled_caches, mx.bfloat16, no_quantized_caches)


def converted(source: Path, bits: int, group_size: int, recipe: str) -> Path:
    """`source` quantized by our converter, cached beside it."""
    stem = source.with_name(f"{source.name}-q{bits}-{recipe}")
    return cached_build(stem, [source.name, bits, group_size, recipe], lambda folder: convert(
        source, folder, quantize=True, q_bits=bits, q_group_size=group_size, recipe=recipe,
        report=False, progress=False, log=log))


# ---------------------------------------------------------------------------
# Measurements


@dataclass
class Result:
    geometry: str
    runtime: str
    layers: int
    kv_shared_layers: int
    bits: int
    load_s: float = 0.0
    load_peak_gb: float = 0.0
    ttft_s: Dict[int, float] = field(default_factory=dict)  # prompt length -> time to first token
    decode_context: int = 0
    decode_tok_s: float = 0.0
    weights_gb_per_token: float = 0.0
    kv_gb_per_token: float = 0.0
    ceiling_share: float = 0.0  # decode rate / (bandwidth / bytes read per token)
    run_peak_gb: float = 0.0
    tokens: List[int] = field(default_factory=list)  # greedy continuation of the longest prompt
    # Our decode over synthetic caches (`--long-context`, `--kv-bits`): one
    # {"context", "kv_bits" (None: float), "tok_s", "kv_cache_gb"} per run.
    long_context: List[dict] = field(default_factory=list)


def weight_bytes_per_token(model, text: TextConfig) -> int:
    """Parameter bytes one decode step reads: every parameter except lookup
    tables (the PLE table, an untied input embedding: one row each; a tied
    embedding is also the LM head and is read whole) and expert stacks (only
    top_k of num_experts). Works on either runtime's parameter names."""
    total = 0
    for name, p in tree_flatten(model.parameters()):
        nbytes = p.nbytes
        if "embed_tokens_per_layer" in name or ("embed_tokens" in name and not text.tie_word_embeddings):
            nbytes //= p.shape[0]
        elif "experts" in name:
            nbytes = nbytes * text.top_k_experts // text.num_experts
        total += nbytes
    return total


def kv_bytes_per_token(text: TextConfig, context: int, element_bytes: int) -> int:
    """Cache bytes one decode step reads at `context` tokens: keys and values of
    every K/V-owning layer, a sliding layer's bounded by its window."""
    total = 0
    for layer in range(text.num_hidden_layers):
        if text.kv_source_layer(layer) != layer:
            continue
        tokens = min(context, text.sliding_window) if text.is_sliding(layer) else context
        total += 2 * tokens * text.layer_kv_heads(layer) * text.layer_head_dim(layer) * element_bytes
    return total


def memory_bandwidth_gb_s() -> float:
    """Read bandwidth of this machine: the best of five sums over a 1 GB array."""
    data = np.ones(1 << 28, dtype=np.float32)
    best = min(_timed(data.sum) for _ in range(5))
    return data.nbytes / best / GB


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_prompt(length: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (length,), dtype=mx.int32, key=mx.random.key(seed + length))


def first_logprobs_finite(logprobs) -> None:
    """Random weights that overflow the activations would make timings meaningless."""
    if not mx.all(mx.isfinite(logprobs)).item():
        raise FloatingPointError("non-finite logits: the random weights overflow the activations")


def timed_generation(runtime: Runtime, model, prompt: mx.array, n: int, chunk: int) -> tuple:
    """Time to the first token, the time of the next `n - 1`, and all `n` tokens."""
    start = time.perf_counter()
    steps = runtime.stream(model, prompt, n, chunk)
    token, logprobs = next(steps)
    ttft = time.perf_counter() - start
    first_logprobs_finite(logprobs)
    start = time.perf_counter()
    tokens = [token] + [t for t, _ in steps]
    decode_s = time.perf_counter() - start
    mx.synchronize()  # a step computed ahead must not spill into the next timing
    return ttft, decode_s, tokens


def long_context_decode(runtime: Runtime, model, text: TextConfig, context: int, n: int, seed: int, follow_up: int,
                        kv_bits: Optional[int] = None) -> dict:
    """With `context` tokens already cached: the time to the first token of a
    `follow_up`-token prompt (one prefill chunk) and the memory it takes above
    the weights and caches, then the decode rate; and the caches' size. The
    caches are filled with random keys and values (a real prefill of 8K tokens
    takes hours on this CPU); a step reads them exactly as after a prompt.
    `kv_bits` quantizes the global layers' caches."""

    def fill(cache: list) -> None:
        key = mx.random.key(seed)
        for layer, c in enumerate(cache):  # one cache per K/V-owning layer, in layer order
            heads, width = text.layer_kv_heads(layer), text.layer_head_dim(layer)
            for start in range(0, context, 1024):
                key, k1, k2 = mx.random.split(key, 3)
                shape = (1, heads, min(1024, context - start), width)
                c.update_and_fetch(*[mx.random.normal(shape, key=k).astype(runtime.kv_dtype) for k in (k1, k2)])
                mx.eval(c.state)

    cache = runtime.filled_caches(model, kv_bits, fill)
    mx.eval([c.state for c in cache])
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    steps = runtime.stream(model, random_prompt(follow_up + 1, text.vocab_size, seed), n + 1, follow_up, cache)
    next(steps)
    follow_up_s, follow_up_gb = time.perf_counter() - start, (mx.get_peak_memory() - held) / GB
    start = time.perf_counter()
    for _ in steps:
        pass
    rate = n / (time.perf_counter() - start)
    mx.synchronize()
    return {"context": context, "kv_bits": kv_bits, "tok_s": rate, "kv_cache_gb": sum(c.nbytes for c in cache) / GB,
            "follow_up_tokens": follow_up, "follow_up_s": follow_up_s, "follow_up_peak_gb": follow_up_gb}


def warm_page_cache(folder: Path) -> None:
    """Read every weight file once, so that neither runtime's load time
    includes disk reads the other one then skips."""
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(1 << 26):
                pass


def timed_load(name: str, dtype: Optional[str], folder: Path) -> tuple:
    """(seconds, peak GB) of loading `folder` with the runtime `name`, from the page cache."""
    runtime = ours(dtype) if name == "mlx_gemma4" else mlx_vlm()
    warm_page_cache(folder)
    mx.reset_peak_memory()
    start = time.perf_counter()
    runtime.load(folder)
    return time.perf_counter() - start, mx.get_peak_memory() / GB


def in_new_process(function: Callable, *args):
    """`function(*args)` in a new (spawned) process, whose memory and allocator start fresh."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def load_in_new_process(name: str, dtype: Optional[str], folder: Path) -> tuple:
    """`timed_load` in a new process. In this one, whichever runtime loads later
    reuses memory the allocator already holds, where the first one had the
    pages mapped fresh (26B-A4B 4L: ours 3.4-4.4 s loading first, 1.3-1.5 s
    alone; mlx-vlm 0.4 s second, 1.0-1.3 s alone)."""
    return in_new_process(timed_load, name, dtype, folder)


def benchmark(runtime: Runtime, folder: Path, geometry: str, text: TextConfig, args,
              bandwidth: float) -> Result:
    """Load `folder` with `runtime` (timed in a new process), time every prompt
    length, then decode `args.decode_tokens` greedy tokens after the longest prompt."""
    load_s, load_peak_gb = load_in_new_process(runtime.name, None if args.dtype == "auto" else args.dtype, folder)
    log(f"{geometry} {runtime.name}: loaded in {load_s:.1f} s (new process, which read the files into the page cache)")
    gc.collect()
    mx.clear_cache()
    model = runtime.load(folder)
    result = Result(geometry, runtime.name, text.num_hidden_layers, text.num_kv_shared_layers, args.bits,
                    load_s=load_s, load_peak_gb=load_peak_gb)

    mx.reset_peak_memory()
    timed_generation(runtime, model, random_prompt(4, text.vocab_size, args.seed), 2, args.prefill_chunk)
    longest = max(args.prompt_lengths)
    for length in sorted(args.prompt_lengths):
        n = 1 + args.decode_tokens if length == longest else 1
        ttft, decode_s, tokens = timed_generation(
            runtime, model, random_prompt(length, text.vocab_size, args.seed), n, args.prefill_chunk)
        result.ttft_s[length] = ttft
        log(f"  prompt {length}: first token in {ttft:.2f} s")
    result.decode_context = longest
    result.decode_tok_s = args.decode_tokens / decode_s
    result.tokens = tokens
    result.weights_gb_per_token = weight_bytes_per_token(model, text) / GB
    result.kv_gb_per_token = kv_bytes_per_token(text, longest, runtime.kv_dtype.size) / GB
    per_token = result.weights_gb_per_token + result.kv_gb_per_token
    result.ceiling_share = result.decode_tok_s * per_token / bandwidth
    log(f"  decode: {result.decode_tok_s:.2f} tok/s")
    result.run_peak_gb = mx.get_peak_memory() / GB  # before the synthetic long caches
    # Long contexts are compared with the same synthetic-cache measurement at the prompt's length.
    contexts = [longest, *args.long_context] if args.long_context else []
    no_quantized = runtime.no_quantized_caches(text)
    if args.kv_bits and contexts and no_quantized:
        log(f"  no quantized caches for {runtime.name} here: {no_quantized}")
    for context in contexts:
        for kv_bits in [None] + (args.kv_bits if context != longest and not no_quantized else []):
            run = long_context_decode(runtime, model, text, context, args.decode_tokens, args.seed,
                                      args.follow_up_tokens, kv_bits)
            result.long_context.append(run)
            log(f"  {context} tokens of context, {f'{kv_bits}-bit' if kv_bits else 'float'} caches "
                f"({run['kv_cache_gb']:.3f} GB): {args.follow_up_tokens} more tokens in {run['follow_up_s']:.1f} s, "
                f"peak {run['follow_up_peak_gb']:.3f} GB above weights and caches; decode {run['tok_s']:.2f} tok/s")
    del model
    return result


# ---------------------------------------------------------------------------
# Reporting and command line


def comparison_table(results: Sequence[Result]) -> str:
    """One Markdown row per geometry and figure: ours, mlx-vlm, ratio."""
    rows = [["geometry", "figure", "mlx_gemma4", "mlx-vlm", "ratio"], ["---"] * 5]
    by_geometry: Dict[str, Dict[str, Result]] = {}
    for r in results:
        by_geometry.setdefault(r.geometry, {})[r.runtime] = r

    def add(geometry, figure, a, b, fmt, faster_is_higher):
        ratio = (a / b if faster_is_higher else b / a) if a and b else float("nan")
        rows.append([geometry, figure, fmt.format(a), fmt.format(b) if b is not None else "-",
                     f"{ratio:.2f}×" if b is not None else "-"])

    for geometry, pair in by_geometry.items():
        a, b = pair["mlx_gemma4"], pair.get("mlx_vlm")
        label = f"{geometry} {a.layers}L ({a.kv_shared_layers} shared), {a.bits}-bit"
        for length, ttft in a.ttft_s.items():
            add(label, f"prefill {length} tok/s", length / ttft, b and length / b.ttft_s[length], "{:.2f}", True)
        add(label, f"decode tok/s at {a.decode_context}", a.decode_tok_s, b and b.decode_tok_s, "{:.2f}", True)
        add(label, "decode, share of bandwidth ceiling", 100 * a.ceiling_share, b and 100 * b.ceiling_share,
            "{:.1f} %", True)
        add(label, "peak GB while generating", a.run_peak_gb, b and b.run_peak_gb, "{:.2f}", False)
        add(label, "load s", a.load_s, b and b.load_s, "{:.1f}", False)
        if b:
            same = sum(x == y for x, y in zip(a.tokens, b.tokens))
            rows.append([label, "greedy tokens equal", f"{same}/{len(a.tokens)}", "", ""])
        long_runs = [{(r["context"], r["kv_bits"]): r for r in x.long_context} if x else {} for x in (a, b)]
        for (context, kv_bits), run in long_runs[0].items():
            if context == a.decode_context:
                continue
            other = long_runs[1].get((context, kv_bits))
            # Float caches against a short context; quantized ones against float caches of the same length.
            base = (a.decode_context, None) if kv_bits is None else (context, None)
            caches = f"{kv_bits}-bit" if kv_bits else "float"
            where = f"{context} cached, {caches} caches"
            add(label, f"decode tok/s, {where}", run["tok_s"], other and other["tok_s"], "{:.2f}", True)
            against = f"{a.decode_context} cached" if kv_bits is None else "float caches"
            relative = [runs[(context, kv_bits)]["tok_s"] / runs[base]["tok_s"] if (context, kv_bits) in runs else None
                        for runs in long_runs]
            add(label, f"decode at {where} / at {against}", *relative, "{:.2f}×", True)
            add(label, f"KV caches GB, {where}", run["kv_cache_gb"], other and other["kv_cache_gb"], "{:.3f}", False)
            add(label, f"{run['follow_up_tokens']}-token follow-up at {where}: s to first token", run["follow_up_s"],
                other and other["follow_up_s"], "{:.1f}", False)
            add(label, "  its peak GB above weights and caches", run["follow_up_peak_gb"],
                other and other["follow_up_peak_gb"], "{:.3f}", False)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", choices=list(GEOMETRIES),
                        help=f"geometries to run (default: {list(DEFAULT_LAYERS)}; --quick: {list(QUICK_LAYERS)})")
    parser.add_argument("--layers", type=int,
                        help=f"decoder layers of every geometry (default: {DEFAULT_LAYERS}; --quick: {QUICK_LAYERS})")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--recipe", default="uniform",
                        help="converter recipe (default: uniform, the layout of the mlx-community repos)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="mlx_gemma4's compute dtype (default: auto, by device); mlx-vlm runs as shipped")
    parser.add_argument("--prompt-lengths", type=int, nargs="+",
                        help=f"prompt lengths in tokens (default: {DEFAULTS['prompt_lengths']})")
    parser.add_argument("--decode-tokens", type=int,
                        help=f"greedy tokens to decode (default: {DEFAULTS['decode_tokens']})")
    parser.add_argument("--long", action="store_true", help="also a 512-token prompt")
    parser.add_argument("--long-context", type=int, nargs="*", default=[],
                        help="also the decode rate with this many tokens cached (e.g. 8192)")
    parser.add_argument("--kv-bits", type=int, nargs="*", default=[], choices=KV_BITS,
                        help="with --long-context: also decode with quantized caches of these bits")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--follow-up-tokens", type=int,
                        help="with --long-context: the prompt fed over the filled caches (default: --prefill-chunk)")
    parser.add_argument("--skip-mlx-vlm", action="store_true", help="time mlx_gemma4 only")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny run for CI: layers {QUICK_LAYERS}, prompts {QUICK['prompt_lengths']}, "
                        f"{QUICK['decode_tokens']} decode tokens")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    args.geometry = args.geometry or list(QUICK_LAYERS if args.quick else DEFAULT_LAYERS)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if args.long and 512 not in args.prompt_lengths:
        args.prompt_lengths.append(512)
    args.follow_up_tokens = args.follow_up_tokens or args.prefill_chunk
    if min(args.prompt_lengths) < 1 or min(args.decode_tokens, args.prefill_chunk, args.follow_up_tokens) < 1:
        parser.error("prompt lengths, --decode-tokens, --prefill-chunk and --follow-up-tokens must be >= 1")
    if args.kv_bits and not args.long_context:
        parser.error("--kv-bits times decoding over long caches: give --long-context too")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    layer_defaults = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    runtimes = [ours(None if args.dtype == "auto" else args.dtype)] + ([] if args.skip_mlx_vlm else [mlx_vlm()])
    bandwidth = memory_bandwidth_gb_s()
    log(f"memory read bandwidth: {bandwidth:.1f} GB/s")
    results = []
    for geometry in args.geometry:
        source = ensure_checkpoint(args.cache_dir, geometry, args.layers or layer_defaults[geometry], args.seed)
        folder = converted(source, args.bits, args.group_size, args.recipe)
        text = ModelConfig.from_dict(read_config(folder)).text_config
        with tempfile.TemporaryDirectory() as tmp:
            for runtime in runtimes:
                where = mlx_vlm_view(folder, Path(tmp) / "mlx_vlm") if runtime.name == "mlx_vlm" else folder
                results.append(benchmark(runtime, where, geometry, text, args, bandwidth))
    if args.json:  # first: the measurements outlast any fault in the table
        payload = {"machine": machine(), "bandwidth_gb_s": bandwidth, "argv": sys.argv,
                   "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2))
    print(comparison_table(results))


if __name__ == "__main__":
    main()
