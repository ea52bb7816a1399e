"""Streaming generation: the Python API and `python -m mlx_gemma4.generate`.

mlx-lm's `generate_step` and streaming detokenizers are not used: importing
any `mlx_lm` module loads transformers (and torch where installed), and its
detokenizers expect a transformers tokenizer. Our processor holds a
`tokenizers.Tokenizer`, whose own `DecodeStream` handles byte-fallback and
SentencePiece spacing incrementally.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from tokenizers.decoders import DecodeStream

from . import streams
from .prefill import PREFILL_STEP_SIZE, prefill
from .response import ANSWER, ChannelParser, GenerationResult, starts_inside_thought
from .sampling import log_probabilities, make_sampler
from .speculative import speculative_tokens
from .tools import tool_schemas

Prompt = Union[str, List[int], List[dict]]


@dataclass
class Response:
    """One streamed piece: new `text` on a `channel` ("thinking", "answer" or
    "tool_call"; empty text while a character or tag is incomplete), the
    `token` that produced it, and running statistics."""

    text: str
    token: int
    channel: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None
    logprobs: Optional[mx.array] = None
    # With a draft model: the share of drafted tokens the model accepted so far.
    draft_acceptance: Optional[float] = None


def generate_tokens(
    model,
    prompt: mx.array,
    *,
    cache: Optional[list] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Sequence[Callable] = (),
    prefill_step_size: int = PREFILL_STEP_SIZE,
    multimodal_inputs: Optional[Dict[str, mx.array]] = None,
) -> Iterator[tuple]:
    """Yield `(token_id, logprobs)` forever after prefilling `prompt` (1-D ids).

    The prompt prefills in chunks of at most `prefill_step_size` tokens through
    the cache (see `prefill.feed`: fewer over a long context, and never
    cutting an image block; the prompt must not end inside one, chat templates
    end it with the generation prompt).
    The next token is computed while the caller handles the current one.
    """
    streams.this_thread()  # a worker thread then cleans up its MLX state as it ends
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or make_sampler()  # greedy
    history = prompt

    def step(tokens: mx.array, extra: dict) -> tuple:
        logits = model(tokens[None], cache, **extra)[:, -1, :].astype(mx.float32)
        for processor in logits_processors:
            logits = processor(history, logits)
        logprobs = log_probabilities(logits)
        return sampler(logprobs), logprobs

    prefill(model, prompt, cache, prefill_step_size, multimodal_inputs)
    token, logprobs = step(prompt[-1:], {})
    mx.async_eval(token, logprobs)
    try:
        while True:
            if logits_processors:
                history = mx.concatenate([history, token])
            next_token, next_logprobs = step(token, {})
            mx.async_eval(next_token, next_logprobs)
            yield token.item(), logprobs[0]
            token, logprobs = next_token, next_logprobs
    finally:
        # The step computed ahead is still queued when the caller stops: a
        # process that exits with MLX work in flight can abort in its heap
        # teardown (seen here on the CPU backend, 1 exit in 5: "malloc_consolidate()";
        # mlx-swift issue 143 is the same on Metal), and so does one whose
        # generating thread ended with work queued on its CPU streams. So wait.
        streams.synchronize()


def prepare_prompt(processor, prompt: Prompt, *, tools=None, enable_thinking: bool = False,
                   images=None, audio=None, videos=None, **media_options) -> tuple:
    """Token ids, multimodal arrays and prompt text for a string (already
    templated), token ids, or chat messages (rendered with the checkpoint's template)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = processor.apply_chat_template(
            prompt, tools=tool_schemas(tools) if tools else None, enable_thinking=enable_thinking
        )
    if isinstance(prompt, str):
        if images or audio or videos:
            inputs = processor(prompt, images=images, audio=audio, videos=videos, **media_options)
            ids = inputs.pop("input_ids")[0].tolist()
            inputs.pop("attention_mask", None)
            return ids, inputs, prompt
        return processor.encode(prompt), {}, prompt
    if images or audio or videos:
        raise ValueError("images, audio and videos need a text prompt with their placeholders, not token ids")
    return list(prompt), {}, processor.decode(list(prompt))


def stream_generate(
    model,
    processor,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    logits_processors: Sequence[Callable] = (),
    stop_tokens: Optional[set] = None,
    cache: Optional[list] = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    tools=None,
    enable_thinking: bool = False,
    images=None,
    audio=None,
    videos=None,
    image_token_budget: Optional[int] = None,
    video_token_budget: Optional[int] = None,
    return_logprobs: bool = False,
    draft_model=None,
    draft_tokens: Optional[int] = None,
) -> Iterator[Response]:
    """Stream the continuation of `prompt`.

    `prompt` is templated text, token ids, or a list of chat messages (then
    `tools` — JSON schemas or typed, documented Python functions — and
    `enable_thinking` go to the chat template). `images`, `audio` and `videos`
    fill the prompt's placeholders (see `Processor.__call__`, also for the
    token budgets). Text arrives on the channel it
    belongs to: thinking, answer or tool_call, tags removed. Stops after
    `max_tokens` or at a stop token (default: every EOS id of config.json,
    generation_config.json and the tokenizer), which is not emitted.

    `draft_model` (a `drafter.Drafter` loaded with `load_drafter`) turns on
    speculative decoding with `draft_tokens` drafts per round (default: the
    drafter's); the tokens are the same as without it (see `speculative`).
    """
    budgets = {k: v for k, v in (("image_token_budget", image_token_budget),
                                 ("video_token_budget", video_token_budget)) if v is not None}
    ids, multimodal, prompt_text = prepare_prompt(processor, prompt, tools=tools, enable_thinking=enable_thinking,
                                                  images=images, audio=audio, videos=videos, **budgets)
    if not ids:
        raise ValueError("the prompt is empty; give some text to continue")
    limit = model.config.text_config.max_position_embeddings
    held = cache[0].offset if cache else 0
    if limit and held + len(ids) + max_tokens > limit:
        raise ValueError(f"context ({held} cached + {len(ids)} prompt tokens) plus max_tokens ({max_tokens}) "
                         f"exceeds the model's {limit} positions; shorten the prompt or lower max_tokens")
    stops = set(stop_tokens) if stop_tokens is not None else stop_token_ids(model, processor)
    parser = ChannelParser(inside_thought=starts_inside_thought(prompt_text))
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = 0.0
    prompt_ids = mx.array(ids, dtype=mx.int32)
    draft_stats = {}
    if draft_model is None:
        tokens = generate_tokens(model, prompt_ids, cache=cache, sampler=sampler, logits_processors=logits_processors,
                                 prefill_step_size=prefill_step_size, multimodal_inputs=multimodal)
    elif logits_processors:
        raise ValueError("a repetition penalty (logits processors) cannot be combined with a draft model; drop one")
    else:
        tokens = speculative_tokens(model, draft_model, prompt_ids, cache=cache, sampler=sampler,
                                    draft_tokens=draft_tokens, prefill_step_size=prefill_step_size,
                                    multimodal_inputs=multimodal, stats=draft_stats)
    stream = TextStream(processor)
    for n, (token, logprobs) in zip(range(1, max_tokens + 1), tokens):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - start)
            start = time.perf_counter()
        finish = "stop" if token in stops else "length" if n == max_tokens else None
        text = "" if token in stops else stream.add(token)
        if finish:
            text += stream.flush()
        pieces = parser.feed(text, final=finish is not None) or [(parser.channel, "")]
        elapsed = time.perf_counter() - start
        for i, (channel, piece) in enumerate(pieces):
            yield Response(
                text=piece, token=token, channel=channel, prompt_tokens=len(ids), prompt_tps=prompt_tps,
                generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                finish_reason=finish if i == len(pieces) - 1 else None,
                logprobs=logprobs if return_logprobs else None,
                draft_acceptance=draft_stats["accepted"] / draft_stats["drafted"] if draft_stats.get("drafted") else None,
            )
        if finish:
            return


class TextStream:
    """Text of generated tokens as they arrive.

    The tokenizers `DecodeStream` handles byte-fallback and SentencePiece
    spacing incrementally, but refuses a stream whose earlier bytes were not
    valid UTF-8 (a broken-off emoji, say); from then on the whole decode is
    diffed, holding back a trailing incomplete character.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokens: List[int] = []
        self.emitted = 0
        self._decoder: Optional[DecodeStream] = DecodeStream(skip_special_tokens=False)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = None
        if self._decoder is not None:
            try:
                text = self._decoder.step(self.processor.tokenizer, token) or ""
            except Exception:  # tokenizers raises a bare Exception for an invalid prefix
                self._decoder = None
        if text is None:
            text = self.processor.decode(self.tokens)[self.emitted:].rstrip("\ufffd")
        self.emitted += len(text)
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end)."""
        text = self.processor.decode(self.tokens)[self.emitted:]
        self.emitted += len(text)
        return text


def stop_token_ids(model, processor) -> set:
    """EOS ids from config.json, generation_config.json and the tokenizer."""
    return set(model.config.eos_token_ids) | set(processor.eos_token_ids)


def generate_result(model, processor, prompt: Prompt, **kwargs) -> GenerationResult:
    """The whole response, split into thinking, answer and parsed tool calls."""
    return GenerationResult.collect(stream_generate(model, processor, prompt, **kwargs))


def generate(model, processor, prompt: Prompt, **kwargs) -> str:
    """The answer to `prompt` as one string (thinking and tool calls left out;
    see `generate_result` for them). Arguments as for `stream_generate`."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, **kwargs) if r.channel == ANSWER)


if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main())
