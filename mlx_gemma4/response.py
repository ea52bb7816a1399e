"""Splitting the model's output stream into thinking, answer and tool calls.

Gemma 4 thinks inside `<|channel>thought\\n … <channel|>` and calls tools inside
`<|tool_call> … <tool_call|>`. The parser works on text deltas, holding back
a possible partial tag, so it is right whether a tag is one special token or
is split across several tokens (fine-tunes, other tokenizers). A stream may
start inside a thought when the prompt already opened one (templates do so
after a tool response).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .tools import ToolCall, parse_tool_calls

THINKING, ANSWER, TOOL_CALL = "thinking", "answer", "tool_call"

OPEN_THOUGHT, CLOSE_THOUGHT = "<|channel>", "<channel|>"
OPEN_CALL, CLOSE_CALL = "<|tool_call>", "<tool_call|>"
_OPENERS = {OPEN_THOUGHT: THINKING, OPEN_CALL: TOOL_CALL}
_CLOSERS = {THINKING: CLOSE_THOUGHT, TOOL_CALL: CLOSE_CALL}


def starts_inside_thought(prompt: str) -> bool:
    """Whether the prompt ends with a thought block still open."""
    return prompt.rfind(OPEN_THOUGHT) > prompt.rfind(CLOSE_THOUGHT)


def _partial_tag_length(text: str, tags) -> int:
    """Length of the longest suffix of `text` that begins some tag."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ChannelParser:
    """Feed text deltas; get `(channel, text)` pieces back, tags removed."""

    def __init__(self, inside_thought: bool = False):
        self.channel = THINKING if inside_thought else ANSWER
        # Right after `<|channel>` comes the channel's name line ("thought\n").
        self._expect_name = False
        self._pending = ""

    def feed(self, text: str, final: bool = False) -> List[Tuple[str, str]]:
        text = self._pending + text
        self._pending = ""
        pieces = []
        while text:
            if self._expect_name:
                newline = text.find("\n")
                if newline < 0 and not final:
                    self._pending = text
                    return pieces
                self._expect_name = False
                text = "" if newline < 0 else text[newline + 1:]
                continue
            tags = [_CLOSERS[self.channel]] if self.channel != ANSWER else list(_OPENERS)
            hits = [(text.find(tag), tag) for tag in tags if tag in text]
            if hits:
                index, tag = min(hits)
                pieces.append((self.channel, text[:index]))
                text = text[index + len(tag):]
                if self.channel == ANSWER:
                    self.channel = _OPENERS[tag]
                    self._expect_name = tag == OPEN_THOUGHT
                else:
                    self.channel = ANSWER
                continue
            keep = 0 if final else _partial_tag_length(text, tags)
            pieces.append((self.channel, text[: len(text) - keep]))
            self._pending = text[len(text) - keep:]
            text = ""
        return [(c, t) for c, t in pieces if t]


@dataclass
class GenerationResult:
    """A whole response, split: what the model thought, answered and called."""

    thinking: str = ""
    answer: str = ""
    tool_calls: List[ToolCall] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    # With a draft model: the share of drafted tokens kept.
    draft_acceptance: Optional[float] = None

    @classmethod
    def collect(cls, responses) -> "GenerationResult":
        """Gather a `stream_generate` stream into one result."""
        result, calls = cls(), ""
        for r in responses:
            if r.channel == THINKING:
                result.thinking += r.text
            elif r.channel == TOOL_CALL:
                calls += r.text
            else:
                result.answer += r.text
            result.finish_reason = r.finish_reason or result.finish_reason
            result.prompt_tokens, result.generation_tokens = r.prompt_tokens, r.generation_tokens
            result.prompt_tps, result.generation_tps = r.prompt_tps, r.generation_tps
            result.peak_memory_gb, result.draft_acceptance = r.peak_memory_gb, r.draft_acceptance
        result.tool_calls = parse_tool_calls(calls) if calls.strip() else []
        result.thinking, result.answer = result.thinking.strip(), result.answer.strip()
        return result
