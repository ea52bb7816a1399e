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
from .cache import RotatingKVCache, cache_offset, prefill
from .config import SLIDING
from .drafter import Drafter, kv_store_layer


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class DrafterKV:
    """The target K/V a drafter reads, by layer type: the cache of the target's
    last K/V-owning layer of each type.

    transformers' drafter sees the last `sliding_window + 1` positions on its
    sliding layers (its bidirectional window is inclusive), one more than a
    sliding cache keeps; `remember`, called before each target pass, keeps the
    sliding state from before it, where that position still is.
    """

    def __init__(self, model, drafter: Drafter, cache: List):
        target = model.config.text_config
        self.cache = cache
        self.layers = {kind: kv_store_layer(target, kind) for kind in set(drafter.config.text_config.layer_types)}
        self.window = drafter.config.text_config.sliding_window
        self.earlier = None

    def remember(self) -> None:
        sliding = self.cache[self.layers[SLIDING]] if SLIDING in self.layers else None
        if isinstance(sliding, RotatingKVCache) and sliding.keys is not None:
            self.earlier = sliding.offset, sliding.state

    def shared(self) -> Dict[str, KV]:
        out = {}
        for kind, layer in self.layers.items():
            keys, values = self.cache[layer].state
            if kind == SLIDING:
                keys, values = self._sliding(self.cache[layer].offset, keys, values)
            out[kind] = keys, values
        return out

    def _sliding(self, offset: int, keys: mx.array, values: mx.array) -> KV:
        wanted, held = min(self.window + 1, offset), keys.shape[2]
        if wanted > held and self.earlier is not None:
            (end, (old_keys, old_values)), first_held = self.earlier, offset - held
            # Positions [offset - wanted, first_held) from the earlier state, which ends at `end`.
            start = end - old_keys.shape[2]
            lo, hi = max(offset - wanted - start, 0), first_held - start
            if 0 <= lo < hi <= old_keys.shape[2]:
                keys = mx.concatenate([old_keys[..., lo:hi, :], keys], axis=2)
                values = mx.concatenate([old_values[..., lo:hi, :], values], axis=2)
        return keys[..., -wanted:, :], values[..., -wanted:, :]


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
    prefill_step_size: int = 512,
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
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    k = drafter.draft_tokens if draft_tokens is None else draft_tokens
    windows = [c.window for c in cache if isinstance(c, RotatingKVCache)]
    if not 1 <= k < min(windows, default=k + 1):
        raise ValueError(f"draft_tokens must be at least 1 and below the smallest attention window "
                         f"({min(windows, default='none')}), got {k}")
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0)
    stats.setdefault("accepted", 0)
    prefill(model, prompt, cache, prefill_step_size, multimodal_inputs)
    target_kv = DrafterKV(model, drafter, cache)
    target_kv.remember()
    logits, hidden = model(prompt[None, -1:], cache, return_hidden=True)
    logprobs = _log_softmax(logits[0])
    last = sampler(logprobs)
    # The caches before the last verifying pass, the tokens of it they kept and
    # how many of the round's tokens the caller took: when it stops, `_settle`
    # makes the cache hold exactly the tokens yielded.
    checkpoints, held, yielded = None, 0, 0
    try:
        yielded = 1
        yield last.item(), logprobs[0]
        while True:
            drafts = propose(drafter, model, last, hidden, target_kv.shared(), cache_offset(cache), k)
            block = mx.concatenate([last, drafts])
            target_kv.remember()
            checkpoints, held, yielded = [c.checkpoint() for c in cache], k + 1, 0
            logits, hiddens = model(block[None], cache, return_hidden=True)
            logprobs = _log_softmax(logits[0])
            choices = sampler(logprobs)
            chosen, drafted = choices.tolist(), block[1:].tolist()
            accepted = next((i for i, (c, d) in enumerate(zip(chosen, drafted)) if c != d), k)
            stats["drafted"] += k
            stats["accepted"] += accepted
            for c, point in zip(cache, checkpoints):
                c.rewind(point, held, accepted + 1)
            held = accepted + 1
            hidden = hiddens[:, accepted:accepted + 1]
            last = choices[accepted:accepted + 1]
            for i in range(accepted + 1):
                yielded = i + 1
                yield chosen[i], logprobs[i]
    except GeneratorExit:
        _settle(model, cache, checkpoints, held, yielded, last)
        raise
    finally:
        streams.synchronize()  # see generate.generate_tokens


def _settle(model, cache: List, checkpoints, held: int, yielded: int, last: mx.array) -> None:
    """Make the cache hold exactly the tokens yielded: drop accepted drafts the
    caller did not take, or add the last token yielded (never in the cache yet)."""
    if checkpoints is not None and yielded < held:
        for c, point in zip(cache, checkpoints):
            c.rewind(point, held, yielded + 1)
    else:
        model(last[None], cache)
    mx.eval([c.state for c in cache])
