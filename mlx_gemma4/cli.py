"""`python -m mlx_gemma4.generate`: one prompt in, a streamed answer out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from . import precision
from .audio_features import prepare_audio, split_at_silence
from .cache import DEFAULT_QUANTIZED_KV_START, KV_BITS, KV_GROUP_SIZES
from .drafter import load_drafter
from .generate import stream_generate, stop_token_ids
from .image_processing import SUPPORTED_BUDGETS
from .loader import CheckpointError, load
from .response import THINKING, TOOL_CALL
from .sampling import make_logits_processors, make_sampler

DEFAULT_MODEL = "mlx-community/gemma-4-e2b-it-4bit"
DIM, RESET = "\033[2m", "\033[0m"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the generate and chat commands."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id or local checkpoint folder")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default auto: float32 on the CPU backend, the checkpoint's on a GPU)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="bound the global layers' cache too (older tokens are forgotten)")
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="quantize the global layers' cache to this many bits (less memory, all the context kept)")
    p.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=64,
                   help="values per scale and bias in the quantized cache (default 64)")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help="with --kv-bits, keep the cache in floats until it holds this many tokens "
                        f"(default {DEFAULT_QUANTIZED_KV_START}, as mlx-lm; 0 quantizes from the first)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="let the model think before answering")
    p.add_argument("--show-thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="print the thinking (dimmed) as it streams")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--tools", type=Path, default=None, help="a JSON file with a list of tool schemas")
    p.add_argument("--image-budget", type=int, choices=SUPPORTED_BUDGETS, default=None,
                   help="soft tokens per image (default: the checkpoint's)")
    p.add_argument("--draft-model", default=None,
                   help="the model's MTP drafter ('-assistant' repo or folder) for speculative decoding")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="tokens drafted per round (default: the drafter's, else 3)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.generate", description="Generate text with Gemma 4 on MLX.")
    add_model_arguments(p)
    p.add_argument("--prompt", default="Hello!", help="the user message; '-' reads it from stdin")
    p.add_argument("--image", nargs="+", default=None, help="image paths or URLs")
    p.add_argument("--audio", nargs="+", default=None, help="audio file paths")
    p.add_argument("--video", default=None, help="a video file path (needs the [video] extra)")
    p.add_argument("--audio-chunking", action="store_true",
                   help="split clips longer than 30 s at silences into several clips")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True,
                   help="print generation statistics at the end")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Reject values argparse cannot (one line each)."""
    if args.max_tokens <= 0:
        raise ValueError("--max-tokens must be positive")
    if args.temp is not None and args.temp < 0:
        raise ValueError("--temp must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError("--top-k must be >= 0")
    if not 0 <= args.min_p < 1:
        raise ValueError("--min-p must be in [0, 1)")
    if args.max_kv_size is not None and args.max_kv_size <= 0:
        raise ValueError("--max-kv-size must be positive")
    if args.quantized_kv_start < 0:
        raise ValueError("--quantized-kv-start must be 0 or more")
    if args.draft_tokens is not None and (args.draft_model is None or args.draft_tokens < 1):
        raise ValueError("--draft-tokens needs --draft-model and must be at least 1")
    if args.draft_model and args.repetition_penalty not in (None, 1.0):
        raise ValueError("--repetition-penalty cannot be combined with --draft-model; drop one")
    files = (getattr(args, "image", None) or []) + (getattr(args, "audio", None) or [])
    for file in files + ([args.video] if getattr(args, "video", None) else []):
        if "://" not in file and not Path(file).is_file():
            raise ValueError(f"{file}: no such file")


def cache_options(args: argparse.Namespace) -> dict:
    """`make_cache`'s arguments from the flags."""
    return {"max_kv_size": args.max_kv_size, "kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size,
            "quantized_kv_start": args.quantized_kv_start}


def load_models(args: argparse.Namespace) -> tuple:
    """The model, its processor and its drafter (None without --draft-model)."""
    model, processor = load(args.model, revision=args.revision, dtype=args.dtype)
    drafter = load_drafter(args.draft_model, model) if args.draft_model else None
    if drafter is not None and precision.cpu_backend():
        print("note: on MLX's CPU backend a drafter makes decoding slower (a pass over the drafts costs one step "
              "per token there); it pays on a Mac", file=sys.stderr)
    return model, processor, drafter


def read_tools(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--tools {path}: cannot read a JSON list of tool schemas ({e})") from None
    if not isinstance(tools, list):
        raise ValueError(f"--tools {path}: expected a JSON list of tool schemas")
    return tools


def chunk_audio(paths: List[str], processor) -> list:
    """Each clip cut at silences into pieces the model takes (at most 30 s)."""
    extractor = processor.audio_feature_extractor
    if extractor is None:
        raise ValueError("this checkpoint has no audio encoder (only Gemma 4 E2B and E4B take audio)")
    rate = extractor.sampling_rate
    return [piece for path in paths
            for piece in split_at_silence(prepare_audio(path, rate), rate, extractor.max_samples)]


def sampling_setup(args: argparse.Namespace, model) -> tuple:
    """Sampler and logits processors from the flags, defaulting to generation_config.json."""
    defaults = model.config.generation
    if args.seed is not None:
        mx.random.seed(args.seed)
    temp = args.temp if args.temp is not None else defaults.get("temperature", 1.0)
    if args.temp is None and not defaults.get("do_sample", True):
        temp = 0.0
    sampler = make_sampler(
        temp=temp,
        top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        top_k=args.top_k if args.top_k is not None else defaults.get("top_k", 0),
        min_p=args.min_p,
    )
    return sampler, make_logits_processors(repetition_penalty=args.repetition_penalty)


def print_piece(response, show_thinking: bool, color: bool) -> None:
    if response.channel == THINKING:
        if show_thinking and response.text:
            print(f"{DIM}{response.text}{RESET}" if color else response.text, end="", flush=True)
        return
    if response.channel == TOOL_CALL and response.text:
        print(f"{DIM}{response.text}{RESET}" if color else response.text, end="", flush=True)
        return
    print(response.text, end="", flush=True)


def print_stats(last) -> None:
    print("=" * 10)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    if last.draft_acceptance is not None:
        print(f"Drafts accepted: {100 * last.draft_acceptance:.1f}%")
    print(f"Peak memory: {last.peak_memory_gb:.3f} GB")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        tools = read_tools(args.tools)
        model, processor, drafter = load_models(args)
        cache = model.make_cache(**cache_options(args))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    audio = args.audio
    if audio and args.audio_chunking:
        try:
            audio = chunk_audio(audio, processor)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.ignore_chat_template:
        prompt = text
    else:
        content = ([{"type": "image"} for _ in args.image or []] + ([{"type": "video"}] if args.video else [])
                   + [{"type": "audio"} for _ in audio or []] + [{"type": "text", "text": text}])
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content}]
    sampler, processors = sampling_setup(args, model)
    color = sys.stdout.isatty()
    last, status = None, 0
    try:
        for last in stream_generate(
            model, processor, prompt, max_tokens=args.max_tokens, sampler=sampler, logits_processors=processors,
            stop_tokens=stop_token_ids(model, processor), cache=cache,
            tools=tools, enable_thinking=args.thinking, images=args.image, audio=audio,
            videos=[args.video] if args.video else None, image_token_budget=args.image_budget,
            draft_model=drafter, draft_tokens=args.draft_tokens,
        ):
            print_piece(last, args.show_thinking, color)
    except KeyboardInterrupt:
        print("\n[interrupted]")
        status = 130
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print()
    if args.verbose and last is not None:
        print_stats(last)
    return status
