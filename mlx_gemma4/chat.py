"""Multi-turn chat that keeps the KV cache between turns: `python -m mlx_gemma4.chat`.

Each turn renders the whole conversation with the checkpoint's template and
feeds only the tokens the cache does not already hold. Earlier turns are
never prefilled again, however far the conversation runs past the sliding
window. Templates rewrite the last model turn when it becomes history (thoughts
stripped, the empty thought of the generation prompt dropped), so the session
keeps a checkpoint of the caches at the end of the last user turn and rewinds
to it: only the last answer is fed again, in the form the template gives it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx

from .cache import DEFAULT_QUANTIZED_KV_START, load_prompt_cache, save_prompt_cache
from .cli import (add_model_arguments, cache_options, check_arguments, load_models, print_piece, print_stats, read_tools,
                  sampling_setup)
from .generate import Response, stream_generate
from .loader import CheckpointError
from .prefill import PREFILL_STEP_SIZE, feed
from .response import GenerationResult
from .tools import tool_schemas


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model and its caches.

    `send(...)` streams the model's reply to a new user message (or tool
    responses) and records it in `messages`. `prefilled_tokens` counts the
    tokens fed for the last turn's prompt, so re-prefills are visible.
    `max_kv_size`, `kv_bits`, `kv_group_size` and `quantized_kv_start` are
    `model.make_cache`'s, for every cache the session makes (`load` takes the
    file's caches as saved).
    """

    def __init__(self, model, processor, *, system: Optional[str] = None, tools=None,
                 enable_thinking: bool = False, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = 64, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
                 image_token_budget=None):
        self.model, self.processor = model, processor
        self.tools = tool_schemas(tools) if tools else None
        self.enable_thinking = enable_thinking
        self.cache_options = {"max_kv_size": max_kv_size, "kv_bits": kv_bits, "kv_group_size": kv_group_size,
                              "quantized_kv_start": quantized_kv_start}
        self.system = system
        self.media_options = {"image_token_budget": image_token_budget} if image_token_budget else {}
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: List[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []  # every image and audio clip of the conversation, in order
        self.audio: list = []
        self.cache = self.model.make_cache(**self.cache_options)
        self.tokens: List[int] = []  # what the cache holds
        self._checkpoint = None  # (position, per-cache checkpoints)
        self.prefilled_tokens = 0
        self.last_result: Optional[GenerationResult] = None

    def _render(self, messages: List[dict], generation_prompt: bool) -> tuple:
        """Token ids of the conversation and the processor's media arrays."""
        text = self.processor.apply_chat_template(messages, tools=self.tools, enable_thinking=self.enable_thinking,
                                                  add_generation_prompt=generation_prompt)
        if not (self.images or self.audio):
            return self.processor.encode(text), {}
        inputs = self.processor(text, images=self.images or None, audio=self.audio or None, **self.media_options)
        inputs.pop("attention_mask", None)
        return inputs.pop("input_ids")[0].tolist(), inputs

    def _media_between(self, ids: List[int], media: dict, start: int, end: int) -> dict:
        """The media arrays of the image / audio blocks that begin in `ids[start:end]`."""
        config, selected = self.model.config, {}

        def blocks_before(position: int, token: int) -> int:
            return sum(1 for i in range(position) if ids[i] == token and (i == 0 or ids[i - 1] != token))

        for token, keys in ((config.image_token_id, ("pixel_values", "image_position_ids")),
                            (config.audio_token_id, ("input_features", "input_features_mask"))):
            if keys[0] in media:
                first, last = blocks_before(start, token), blocks_before(end, token)
                if last > first:
                    selected.update({k: media[k][first:last] for k in keys})
        if "mm_token_type_ids" in media:
            selected["mm_token_type_ids"] = media["mm_token_type_ids"][:, start:end]
        return selected

    def _rewind_to(self, ids: List[int]) -> int:
        """Make the cache hold a prefix of `ids`; return that prefix's length."""
        common = _common_prefix(self.tokens, ids)
        if common == len(self.tokens):
            return common
        if self._checkpoint and self._checkpoint[0] <= common:
            return self._restore_checkpoint()
        self.cache, self.tokens = self.model.make_cache(**self.cache_options), []
        return 0

    def _restore_checkpoint(self) -> int:
        position, checkpoints = self._checkpoint
        for c, point in zip(self.cache, checkpoints):
            c.restore(point)
        self.tokens = self.tokens[:position]
        return position

    def _feed(self, ids: List[int], media: dict) -> None:
        """Feed `ids` after what the cache holds (in chunks that keep each image block whole)."""
        start = len(self.tokens)
        feed(self.model, mx.array(ids[start:]), self.cache, PREFILL_STEP_SIZE,
             self._media_between(ids, media, start, len(ids)))
        self.tokens = list(ids)

    def send(self, content=None, *, images: Optional[list] = None, audio: Optional[list] = None,
             tool_responses: Optional[List[dict]] = None, **generation_kwargs) -> Iterator[Response]:
        """Stream the reply to a user message `content` (text or a list of parts)
        with optional `images` / `audio` placed before the text, or to
        `tool_responses` (`[{"name": ..., "response": ...}]`) answering the tool
        calls of the previous reply. Keyword arguments go to `stream_generate`.
        Images already in the conversation are not encoded again."""
        continuing = bool(tool_responses)
        if continuing:
            if not self.messages or not self.messages[-1].get("tool_calls"):
                raise ValueError("tool_responses answer tool calls, but the last reply made none")
            # The model continues the turn that made the calls.
            self.messages[-1]["tool_responses"] = tool_responses
        if images or audio:
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            content = [{"type": "image"} for _ in images or []] + [{"type": "audio"} for _ in audio or []] + parts
            self.images += list(images or [])
            self.audio += list(audio or [])
        if content is not None:
            self.messages.append({"role": "user", "content": content})
        history, _ = self._render(self.messages, generation_prompt=False)
        ids, media = self._render(self.messages, generation_prompt=True)
        start = self._rewind_to(ids)
        self.prefilled_tokens = len(ids) - start
        if start < len(history):
            self._feed(ids[:len(history)], media)
            start = len(history)
        self._checkpoint = (len(self.tokens), [c.checkpoint() for c in self.cache])
        prompt, responses, finished = ids[start:], [], False
        try:
            for r in stream_generate(self.model, self.processor, prompt, cache=self.cache, **generation_kwargs):
                responses.append(r)
                yield r
            finished = True
        finally:
            if not finished:  # interrupted: undo the turn, keep the caches consistent
                self._restore_checkpoint()
                if content is not None:
                    self.messages.pop()
                    del self.images[len(self.images) - len(images or []):]
                    del self.audio[len(self.audio) - len(audio or []):]
                if continuing:
                    del self.messages[-1]["tool_responses"]
        self.tokens += prompt + _stream_tokens(responses)
        result = GenerationResult.collect(responses)
        if continuing and not result.tool_calls:
            self.messages[-1]["content"] = result.answer
        else:
            message = {"role": "model", "content": result.answer}
            if result.tool_calls:
                message["tool_calls"] = [call.as_message_item() for call in result.tool_calls]
            self.messages.append(message)
        self.last_result = result

    def save(self, path: str) -> None:
        """Save the caches and the tokens they hold (safetensors)."""
        save_prompt_cache(path, self.cache, self.tokens)

    def load(self, path: str) -> None:
        """Load caches saved by `save`; the next turn reuses whatever prefix matches."""
        self.cache, self.tokens = load_prompt_cache(path)
        self._checkpoint = None


def _stream_tokens(responses: List[Response]) -> List[int]:
    """Token ids of a response stream (one token can yield several pieces)."""
    tokens, last = [], None
    for r in responses:
        if r.generation_tokens != last:
            tokens.append(r.token)
            last = r.generation_tokens
    return tokens


HELP = ("Commands: /image PATH  /audio PATH (attach to your next message)  /reset  /system TEXT  "
        "/save FILE  /load FILE  /help  /quit   (Ctrl-D quits)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.chat", description="Chat with Gemma 4 on MLX.")
    add_model_arguments(p)
    p.add_argument("--prompt-cache", default=None, help="start from caches saved with /save")
    return p


def _command(session: ChatSession, line: str, attached: dict) -> Optional[str]:
    """Run a /command; return what to print, or None to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return None
    if name in ("/image", "/audio"):
        if not arg or ("://" not in arg and not Path(arg).is_file()):
            return f"[{name} needs an existing file]"
        attached[name[1:]].append(arg)
        return f"[{arg} will go with your next message]"
    if name == "/reset":
        session.reset()
        return "[conversation reset]"
    if name == "/system":
        session.system = arg or None
        session.reset()
        return "[system prompt set; conversation reset]"
    if name in ("/save", "/load") and not arg:
        return f"[{name} needs a file name]"
    if name == "/save":
        session.save(arg)
        return f"[saved {len(session.tokens)} tokens to {arg}]"
    if name == "/load":
        session.load(arg)
        return f"[loaded {len(session.tokens)} cached tokens from {arg}]"
    return HELP


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        model, processor, drafter = load_models(args)
        session = ChatSession(model, processor, system=args.system, tools=read_tools(args.tools),
                              enable_thinking=args.thinking, image_token_budget=args.image_budget,
                              **cache_options(args))
        if args.prompt_cache:
            session.load(args.prompt_cache)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampler, processors = sampling_setup(args, model)
    color = sys.stdout.isatty()
    print(HELP)
    attached = {"image": [], "audio": []}
    while True:
        try:
            line = input(">> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            try:
                reply = _command(session, line, attached)
            except (OSError, ValueError) as e:
                reply = f"[error: {e}]"
            if reply is None:
                return 0
            print(reply)
            continue
        last = None
        try:
            for last in session.send(line, images=attached["image"], audio=attached["audio"],
                                     max_tokens=args.max_tokens, sampler=sampler, logits_processors=processors,
                                     draft_model=drafter, draft_tokens=args.draft_tokens):
                print_piece(last, args.show_thinking, color)
        except KeyboardInterrupt:
            print("\n[interrupted; that turn was dropped]")
        except ValueError as e:
            print(f"[error: {e}]")
        attached = {"image": [], "audio": []}
        print()
        if last is not None:
            print_stats(last)


if __name__ == "__main__":
    sys.exit(main())
