"""Streaming text generation: the Python API and `python -m mlx_gemma4.generate`.

mlx-lm's `generate_step` and streaming detokenizers are not used: importing
any `mlx_lm` module loads transformers (and torch where installed), and its
detokenizers expect a transformers tokenizer. Our processor holds a
`tokenizers.Tokenizer`, whose own `DecodeStream` handles byte-fallback and
SentencePiece spacing incrementally.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from tokenizers.decoders import DecodeStream

from .loader import CheckpointError, load, resolve
from .sampling import make_logits_processors, make_sampler

DEFAULT_MODEL = "mlx-community/gemma-4-e2b-it-4bit"


@dataclass
class Response:
    """One streamed step: the new `text` (may be empty while a character is
    incomplete), its `token`, and running statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None


def generate_tokens(
    model,
    prompt: mx.array,
    *,
    cache: Optional[list] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Sequence[Callable] = (),
    prefill_step_size: int = 512,
) -> Iterator[int]:
    """Yield sampled token ids forever, prefilling `prompt` (1-D ids) in chunks.

    The next token is computed while the caller handles the current one.
    """
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    history = prompt

    def step(tokens: mx.array) -> mx.array:
        nonlocal history
        logits = model(tokens[None], cache)[:, -1, :]
        for processor in logits_processors:
            logits = processor(history, logits)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return token

    while prompt.size > prefill_step_size:
        model(prompt[None, :prefill_step_size], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[prefill_step_size:]
    token = step(prompt)
    mx.async_eval(token)
    while True:
        if logits_processors:
            history = mx.concatenate([history, token])
        next_token = step(token)
        mx.async_eval(next_token)
        yield token.item()
        token = next_token


def stream_generate(
    model,
    processor,
    prompt: Union[str, List[int]],
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    stop_tokens: Optional[set] = None,
    cache: Optional[list] = None,
    prefill_step_size: int = 512,
) -> Iterator[Response]:
    """Stream the continuation of `prompt` (already templated text, or token ids).

    Stops after `max_tokens` or at any stop token (default: the model's EOS ids
    plus the processor's); the stop token itself is not emitted as text.
    """
    ids = processor.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty; give some text to continue")
    stops = set(stop_tokens) if stop_tokens is not None else stop_token_ids(model, processor)
    decoder = DecodeStream(skip_special_tokens=False)
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = 0.0
    tokens = generate_tokens(model, mx.array(ids, dtype=mx.int32), cache=cache, sampler=sampler,
                             logits_processors=logits_processors, prefill_step_size=prefill_step_size)
    generated, emitted = [], 0
    for n, token in zip(range(1, max_tokens + 1), tokens):
        if n == 1:
            prompt_time = time.perf_counter() - start
            prompt_tps = len(ids) / prompt_time
            start = time.perf_counter()
        finish = "stop" if token in stops else "length" if n == max_tokens else None
        text = ""
        if token not in stops:
            generated.append(token)
            text = decoder.step(processor.tokenizer, token) or ""
        if finish:
            # Flush bytes the stream still holds (an incomplete character at the end).
            text += processor.decode(generated)[emitted + len(text):]
        emitted += len(text)
        elapsed = time.perf_counter() - start
        yield Response(
            text=text, token=token, prompt_tokens=len(ids), prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish,
        )
        if finish:
            return


def stop_token_ids(model, processor) -> set:
    """EOS ids from config.json, generation_config.json and the tokenizer."""
    return set(model.config.eos_token_ids) | set(processor.eos_token_ids)


def generate(model, processor, prompt: Union[str, List[int]], **kwargs) -> str:
    """The whole continuation of `prompt` as one string (see `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, **kwargs))


def _generation_defaults(folder: Path) -> dict:
    file = folder / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.generate", description="Generate text with Gemma 4 on MLX.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub repo id or local checkpoint folder")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--prompt", default="Hello!", help="the user message; '-' reads it from stdin")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast float weights (default: as stored)")
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True,
                   help="print generation statistics at the end")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens <= 0:
        print("error: --max-tokens must be positive", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        folder = resolve(args.model, args.revision)
        model, processor = load(folder, dtype=args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = _generation_defaults(folder)
    if args.seed is not None:
        mx.random.seed(args.seed)
    temp = args.temp if args.temp is not None else defaults.get("temperature", 1.0)
    if not defaults.get("do_sample", True) and args.temp is None:
        temp = 0.0
    sampler = make_sampler(
        temp=temp,
        top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        top_k=args.top_k if args.top_k is not None else defaults.get("top_k", 0),
        min_p=args.min_p,
    )
    processors = make_logits_processors(repetition_penalty=args.repetition_penalty)
    eos = defaults.get("eos_token_id", [])
    stops = stop_token_ids(model, processor) | set([eos] if isinstance(eos, int) else eos)
    if not args.ignore_chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = processor.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    last = None
    for last in stream_generate(model, processor, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                logits_processors=processors, stop_tokens=stops):
        print(last.text, end="", flush=True)
    print()
    if args.verbose and last is not None:
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
