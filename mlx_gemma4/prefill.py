"""Feeding a prompt into the caches in chunks.

A chunk's attention scores on a global layer are materialised (by MLX on the
CPU always, on Metal for head dim 512, which has no fused kernel for more than
8 queries): for 31B with 128 K tokens cached a 512-token chunk's would take
8.6 GB per layer in float32. So chunks shrink as the cache grows, keeping
their scores within `SCORE_BUDGET`. Splitting inside the attention instead
would need a sync per block there, which computes the layers whose output
prefill otherwise never evaluates (the KV-shared ones).

Prompts with images, video or audio are chunked the same way, with their
encoders' outputs merged into the input embeddings once; a chunk ends only
outside an image block, whose tokens attend to each other both ways.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .cache import cache_offset

# Tokens per prompt chunk unless the score budget asks for fewer.
PREFILL_STEP_SIZE = 512
# Bytes a prompt chunk's attention scores may take.
SCORE_BUDGET = 512 << 20


def chunk_within_budget(heads: int, cached: int, step_size: int) -> int:
    """The longest chunk, at most `step_size` tokens, whose float32 scores over
    `cached` earlier tokens and itself take at most `SCORE_BUDGET` bytes."""
    pairs = SCORE_BUDGET // (4 * heads)  # query-key pairs per head
    longest = (math.isqrt(cached * cached + 4 * pairs) - cached) // 2  # n * (cached + n) <= pairs
    return max(1, min(step_size, longest))


def block_spans(blocks: Optional[mx.array]) -> List[Tuple[int, int]]:
    """`(first, end)` of each bidirectional block in `blocks` (`[1, T]`, a
    block index per token, -1 for the others; see `Model.vision_blocks`) with
    the token either side: the begin- and end-of-image tokens, which a model
    call checks its ends against to refuse a cut block."""
    if blocks is None:
        return []
    ids = np.asarray(blocks[0])
    edges = np.flatnonzero(np.diff(ids, prepend=-1, append=-1))
    return [(int(a) - 1, int(b) + 1) for a, b in zip(edges, edges[1:]) if ids[a] >= 0]


def chunk_end(start: int, longest: int, end: int, blocks: Sequence[Tuple[int, int]]) -> int:
    """Where a chunk starting at `start` of at most `longest` tokens ends (at
    `end` at the latest): before the block it would cut, or after that block
    when the chunk starts with it (an image block is fed whole, however long)."""
    stop = min(start + longest, end)
    for first, last in blocks:
        if first < stop < last:
            return first if first > start else last
    return stop


def feed(model, tokens: mx.array, cache: List, step_size: int, media: Optional[dict] = None) -> None:
    """Feed `tokens` (1-D ids) through `cache` in chunks of at most `step_size`
    tokens, shrunk to the score budget. `media`: the processor's arrays for
    these tokens (pixel values, audio features, `mm_token_type_ids` `[1, T]`)."""
    if tokens.size == 0:  # a one-token prompt: the first decode step reads it
        return
    media = {k: v for k, v in (media or {}).items() if v is not None}
    types = media.pop("mm_token_type_ids", None)
    ids = tokens[None]
    embeddings = model.embed(ids, **media) if media else None
    blocks = block_spans(model.vision_blocks(ids, types))
    heads = model.config.text_config.num_attention_heads
    start = 0
    while start < tokens.size:
        longest = chunk_within_budget(heads, cache_offset(cache), step_size)
        stop = chunk_end(start, longest, tokens.size, blocks)
        piece = slice(start, stop)
        model(ids[:, piece], cache, input_embeddings=None if embeddings is None else embeddings[:, piece],
              mm_token_type_ids=None if types is None else types[:, piece])
        mx.eval([c.state for c in cache])
        start = stop


def prefill(model, prompt: mx.array, cache: List, step_size: int, multimodal_inputs: Optional[dict] = None) -> None:
    """Feed all but the last token of `prompt` into `cache` (see `feed`; the
    first decode step reads the last one). Evaluating just the cache states
    skips the LM head and the KV-shared layers."""
    media = dict(multimodal_inputs or {})
    if media.get("mm_token_type_ids") is not None:
        media["mm_token_type_ids"] = media["mm_token_type_ids"][:, :-1]
    feed(model, prompt[:-1], cache, step_size, media)
