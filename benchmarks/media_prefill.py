#!/usr/bin/env python
"""Prefill of an image prompt on a bidirectional layout (31B, 26B-A4B): in
score-budgeted chunks around the image blocks, against one call.

The decoder is measured, not the vision encoder (`encoders.py` times that):
the cached text-only benchmark checkpoint of `bench.py` is loaded, the prompt
carries the real Gemma 4 image ids of the reference config (begin-of-image,
`--image-tokens` soft tokens, end-of-image, text between images), and the
encoder's output is replaced by random features. Everything after it is the
product path: `Model.embed` merges the features, `prefill` feeds the prompt.
One call is what mlx-vlm does for these prompts (its `chunked_prefill_policy`
turns chunking off when an image is in a bidirectional model's prompt); it is
our own code with the chunk set to the prompt's length, each run in a new
process, so only the chunking differs.

    python benchmarks/media_prefill.py                         # 31b, 2 layers, 8 images of 280 tokens
    python benchmarks/media_prefill.py --geometry 26b-a4b --layers 4 --images 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import converted, in_new_process  # noqa: E402
from checkpoints import GB, GEOMETRIES, REFERENCE_CONFIGS, ROOT, ensure_checkpoint, log, machine  # noqa: E402
from mlx_gemma4.loader import load_model  # noqa: E402
from mlx_gemma4.prefill import prefill  # noqa: E402

REFERENCE_CONFIG = REFERENCE_CONFIGS / "gemma-4-31B-it.json"
IMAGE_IDS = ("image_token_id", "boi_token_id", "eoi_token_id")
TEXT_BETWEEN = 24  # text tokens before each image and after the last


def media_prompt(ids: dict, vocab: int, images: int, image_tokens: int, seed: int) -> tuple:
    """Token ids `[T]` and `mm_token_type_ids` `[1, T]` of text and image blocks."""
    rng = np.random.default_rng(seed)
    words = rng.integers(1000, min(vocab, 200_000), (images + 1, TEXT_BETWEEN)).tolist()  # below the special ids
    tokens = []
    for text in words[:-1]:
        tokens += text + [ids["boi_token_id"]] + [ids["image_token_id"]] * image_tokens + [ids["eoi_token_id"]]
    tokens += words[-1]
    types = (np.array(tokens) == ids["image_token_id"]).astype(np.int32)
    return mx.array(tokens, dtype=mx.int32), mx.array(types[None])


def run(folder: Path, chunk: Optional[int], images: int, image_tokens: int, seed: int) -> dict:
    """Load, then prefill the image prompt in chunks of `chunk` tokens (None:
    one call); seconds and peak GB above the weights."""
    model = load_model(folder, text_only=True)
    ids = {k: v for k, v in json.loads(REFERENCE_CONFIG.read_text()).items() if k in IMAGE_IDS}
    for name, value in ids.items():  # the text-only checkpoint's config has no image ids
        setattr(model.config, name, value)
    text = model.config.text_config
    prompt, types = media_prompt(ids, text.vocab_size, images, image_tokens, seed)
    features = mx.random.normal((images * image_tokens, text.hidden_size), key=mx.random.key(seed)) * 0.02
    mx.eval(features)
    model.encode_vision = lambda *_args, **_kwargs: features  # the encoder, benchmarked by encoders.py
    media = {"pixel_values": mx.zeros((images,)), "image_position_ids": mx.zeros((images,)),
             "mm_token_type_ids": types}
    cache = model.make_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    prefill(model, prompt, cache, chunk or prompt.size, media)
    seconds = time.perf_counter() - start
    return {"chunk": chunk, "tokens": prompt.size, "seconds": seconds,
            "peak_gb": (mx.get_peak_memory() - held) / GB, "weights_gb": held / GB}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=[g for g in GEOMETRIES if g != "e2b"], default="31b",
                        help="a layout with bidirectional image blocks (default: 31b)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=280, help="soft tokens per image (its budget)")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.layers, args.images, args.image_tokens, args.prefill_chunk) < 1:
        parser.error("--layers, --images, --image-tokens and --prefill-chunk must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    folder = converted(ensure_checkpoint(args.cache_dir, args.geometry, args.layers, args.seed), args.bits, 64,
                       "uniform")
    results = []
    for chunk in (args.prefill_chunk, None):
        log(f"{args.geometry} {args.layers}L: prefill in {'one call' if chunk is None else f'chunks of {chunk}'}")
        results.append(in_new_process(run, folder, chunk, args.images, args.image_tokens, args.seed))
    chunked, whole = results
    print(f"| {args.geometry} {args.layers}L, {args.bits}-bit, {args.images} images x {args.image_tokens} tokens "
          f"({chunked['tokens']} tokens) | chunks of {args.prefill_chunk} | one call | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| peak GB above the weights | {chunked['peak_gb']:.3f} | {whole['peak_gb']:.3f} | "
          f"{chunked['peak_gb'] / whole['peak_gb']:.2f}× |")
    print(f"| prefill s | {chunked['seconds']:.1f} | {whole['seconds']:.1f} | "
          f"{chunked['seconds'] / whole['seconds']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "argv": sys.argv, "results": results}, indent=2))


if __name__ == "__main__":
    main()
