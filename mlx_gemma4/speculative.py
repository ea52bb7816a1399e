"""Speculative decoding with an MTP drafter (see `drafter`).

Each round the drafter proposes `k` tokens from the target's hidden state and
K/V; the target then reads the last token and the `k` drafts in one forward
pass, and the caches keep the tokens it accepted. Every emitted token is the
target's own choice (its argmax, or a sample from its distribution with the
caller's sampler) given the tokens before it, and a draft is accepted only
where it equals that choice: greedy output is exactly the target's greedy
output, and sampled output follows the target's distribution.

On a GPU a forward pass over k + 1 tokens reads the weights once, as one decode
step does, so each accepted draft saves most of a step. MLX's CPU
`quantized_matmul` costs as much per row as a one-row product, so on the CPU
backend the pass costs about k + 1 steps and drafting does not pay
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import mlx.core as mx

from . import streams
from .attention import KV
from .cache import RotatingKVCache, cache_offset
from .config import SLIDING
from .drafter import Drafter
from .prefill import PREFILL_STEP_SIZE, prefill
from .sampling import log_probabilities, make_sampler


class DrafterKV:
    """The target K/V a drafter reads, by layer type: the cache of the target's
    last K/V-owning layer of each type.

    transformers' drafter sees the last `sliding_window + 1` positions on its
    sliding layers (its bidirectional window is inclusive). So the target's
    sliding caches keep `k + 1` positions beyond their window: that one, and
    room for a verifying pass of `k + 1` tokens to be written in place and
    trimmed (see `RotatingKVCache.reserve`). Make this before the prompt goes in.
    """

    def __init__(self, model, drafter: Drafter, cache: List, k: int):
        target = model.config.text_config
        self.cache = cache
        self.layers = {kind: target.last_kv_owner(kind) for kind in set(drafter.config.text_config.layer_types)}
        self.window = drafter.config.text_config.sliding_window
        for c in cache:
            if isinstance(c, RotatingKVCache):
                c.reserve(k + 1)

    def shared(self) -> Dict[str, KV]:
        out = {}
        for kind, layer in self.layers.items():
            keys, values = self.cache[layer].state
            if kind == SLIDING:
                keys, values = keys[..., -(self.window + 1):, :], values[..., -(self.window + 1):, :]
            out[kind] = keys, values
        return out


def propose(drafter: Drafter, model, last: mx.array, hidden: mx.array, shared: Dict[str, KV], position: int,
            k: int) -> mx.array:
    """`k` drafted tokens `[k]` following `last` (`[1]`, at `position`, not in
    the cache yet), from `hidden` (`[1, 1, hidden]`, the target's state at the
    token before) and the target's K/V `shared` (see `DrafterKV`)."""
    token, drafts = last, []
    for _ in range(k):
        h, hidden = drafter(model.language_model.model.embed(token[None]), hidden, shared, position)
        token = drafter.greedy_token(h)[0]
        drafts.append(token)
    drafts = mx.concatenate(drafts)
    # Evaluated here, the drafts' graph lets go of the cache buffers it read, so
    # the verifying pass writes them in place (a write to a global layer's cache
    # that another array still reads copies the whole cache).
    mx.eval(drafts)
    return drafts


def speculative_tokens(
    model,
    drafter: Drafter,
    prompt: mx.array,
    *,
    cache: Optional[list] = None,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    draft_tokens: Optional[int] = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    multimodal_inputs: Optional[Dict[str, mx.array]] = None,
    stats: Optional[dict] = None,
) -> Iterator[tuple]:
    """Yield `(token_id, logprobs)` forever after prefilling `prompt`, like
    `generate.generate_tokens`, drafting `draft_tokens` tokens per round
    (default: the drafter's). `stats`, when given, counts "drafted" and
    "accepted" tokens. When the caller stops, the cache holds the prompt and
    exactly the tokens yielded, as with `generate_tokens`."""
    streams.this_thread()
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or make_sampler()  # greedy
    k = drafter.draft_tokens if draft_tokens is None else draft_tokens
    if k < 1:
        raise ValueError(f"draft_tokens must be at least 1, got {k}")
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0)
    stats.setdefault("accepted", 0)
    target_kv = DrafterKV(model, drafter, cache, k)
    prefill(model, prompt, cache, prefill_step_size, multimodal_inputs)
    logits, hidden = model(prompt[None, -1:], cache, return_hidden=True)
    logprobs = log_probabilities(logits[0])
    last = sampler(logprobs)
    # The tokens of the last verifying pass the caches kept, and how many of the
    # round's tokens the caller took: when it stops, `_settle` makes the cache
    # hold exactly the tokens yielded.
    held, yielded = 0, 1
    try:
        yield last.item(), logprobs[0]
        while True:
            drafts = propose(drafter, model, last, hidden, target_kv.shared(), cache_offset(cache), k)
            block = mx.concatenate([last, drafts])
            held, yielded = k + 1, 0
            logits, hiddens = model(block[None], cache, return_hidden=True)
            logprobs = log_probabilities(logits[0])
            choices = sampler(logprobs)
            chosen, drafted = choices.tolist(), block[1:].tolist()
            accepted = next((i for i, (c, d) in enumerate(zip(chosen, drafted)) if c != d), k)
            stats["drafted"] += k
            stats["accepted"] += accepted
            for c in cache:
                c.trim(k - accepted)
            held = accepted + 1
            hidden = hiddens[:, accepted:accepted + 1]
            last = choices[accepted:accepted + 1]
            for i in range(accepted + 1):
                yielded = i + 1
                yield chosen[i], logprobs[i]
    except GeneratorExit:
        _settle(model, cache, held, yielded, last)
        raise
    finally:
        streams.synchronize()  # see generate.generate_tokens


def _settle(model, cache: List, held: int, yielded: int, last: mx.array) -> None:
    """Make the cache hold exactly the tokens yielded: drop accepted drafts the
    caller did not take, or add the last token yielded (never in the cache yet)."""
    if yielded < held:
        for c in cache:
            c.trim(held - yielded - 1)
    else:
        model(last[None], cache)
    mx.eval([c.state for c in cache])
