"""Token samplers: greedy, temperature, top-k, top-p, min-p; repetition penalty.

mlx-lm's `sample_utils` does the same, but importing it runs `mlx_lm/__init__`,
which imports transformers (and torch where installed); see cache.py.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def log_probabilities(logits: mx.array) -> mx.array:
    """`logits` as float32 log-probabilities over the last axis (what samplers take)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """A function from log-probabilities `[B, vocab]` to token ids `[B]`.

    `temp == 0` is greedy. Filters apply in the order top-k, top-p, min-p, on
    the temperature-free distribution (as transformers and mlx-lm do).
    """
    if temp == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array) -> mx.array:
        logprobs = logprobs.astype(mx.float32)
        if 0 < top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -top_k][..., None]
            logprobs = mx.where(logprobs < kth, -mx.inf, logprobs)
        if 0 < top_p < 1:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
            # Keep a token while the mass before it is below top_p (the first always stays).
            before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
            drop_sorted = before >= top_p
            drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
            logprobs = mx.where(drop, -mx.inf, logprobs)
        if min_p > 0:
            top = logprobs.max(axis=-1, keepdims=True)
            logprobs = mx.where(logprobs < top + mx.log(mx.array(min_p)), -mx.inf, logprobs)
        return mx.random.categorical(logprobs / temp, axis=-1)

    return sample


def make_logits_processors(repetition_penalty: Optional[float] = None, context_size: int = 64) -> List[LogitsProcessor]:
    """Processors `(history_ids, logits) -> logits`; the repetition penalty
    divides positive (multiplies negative) logits of recently seen tokens."""
    if not repetition_penalty or repetition_penalty == 1.0:
        return []
    if repetition_penalty < 0:
        raise ValueError(f"repetition penalty must be positive, got {repetition_penalty}")

    def penalize(history: mx.array, logits: mx.array) -> mx.array:
        seen = history[-context_size:]
        chosen = logits[:, seen]
        chosen = mx.where(chosen < 0, chosen * repetition_penalty, chosen / repetition_penalty)
        logits[:, seen] = chosen
        return logits

    return [penalize]
