"""KV caches and attention masks.

A sliding layer keeps only its last `sliding_window` keys (memory O(window));
a global layer's cache grows with the context; KV-shared layers have no cache,
they read the keys and values their source layer just produced.

mlx-lm's `KVCache` / `RotatingKVCache` would fit, but importing any `mlx_lm`
module imports transformers (and torch where installed) through its package
`__init__`, so the two small classes live here. Their masks are built from
absolute positions, which the vision overlay (bidirectional image blocks on
sliding layers) extends without knowing the cache layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from .attention import Keys, Mask, QuantizedTensor, kv_shape
from .config import SLIDING, TextConfig


def _window_mask(queries: int, first_key: int, first_query: int, keys: int, window: Optional[int]) -> mx.array:
    """Boolean [queries, keys]: causal, and within `window` when given."""
    q = mx.arange(first_query, first_query + queries)[:, None]
    k = mx.arange(first_key, first_key + keys)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def _parts(x: Keys) -> Tuple[mx.array, ...]:
    return tuple(x) if isinstance(x, QuantizedTensor) else (x,)


def _each(f, x: Keys, *others: Keys) -> Keys:
    """`f` applied to each array of `x` (with the matching arrays of `others`), in the form of `x`."""
    if isinstance(x, QuantizedTensor):
        return QuantizedTensor(*(f(*arrays) for arrays in zip(x, *others)))
    return f(x, *others)


class KVCache:
    """Keys and values of every past token (global-attention layers)."""

    step = 256  # grow in blocks so decode does not reallocate every token

    def __init__(self):
        self.keys: Optional[Keys] = None
        self.values: Optional[Keys] = None
        self.offset = 0

    def _stored(self, x: mx.array) -> Keys:
        """New keys or values as the cache holds them."""
        return x

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[Keys, Keys]:
        n, end = keys.shape[2], self.offset + keys.shape[2]
        keys, values = self._stored(keys), self._stored(values)
        if self.keys is None or end > kv_shape(self.keys)[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            room = [_each(lambda a: mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype), x) for x in (keys, values)]
            if self.keys is None:
                self.keys, self.values = room
            else:
                self.keys, self.values = (_each(lambda a, b: mx.concatenate([a, b], axis=2), old, new)
                                          for old, new in zip(self._first(self.offset), room))
        for buffer, new in zip((self.keys, self.values), (keys, values)):
            for a, b in zip(_parts(buffer), _parts(new)):
                a[..., self.offset:end, :] = b
        self.offset = end
        return self._first(end)

    def _first(self, n: int) -> Tuple[Keys, Keys]:
        return tuple(_each(lambda a: a[..., :n, :], x) for x in (self.keys, self.values))

    def make_mask(self, queries: int) -> Mask:
        # "causal" is aligned to the last key, so it holds with a non-empty cache too.
        return "causal" if queries > 1 else None

    @property
    def state(self):
        return [] if self.keys is None else list(self._first(self.offset))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for x in (self.keys, self.values) for a in _parts(x))

    def checkpoint(self) -> int:
        return self.offset

    def restore(self, checkpoint: int) -> None:
        """Forget every token after `checkpoint` (later writes overwrite them)."""
        self.offset = checkpoint

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (later writes overwrite them)."""
        self.offset -= n

    def load_state(self, keys: Keys, values: Keys) -> None:
        self.keys, self.values, self.offset = keys, values, kv_shape(keys)[2]


class QuantizedKVCache(KVCache):
    """A global layer's keys and values quantized (affine, `bits` per value, a
    scale and bias per `group_size` values of a head), read by
    `attention.quantized_attention`. Sliding layers keep float caches: they
    hold at most a window, and are the ones a long context does not grow.

    Up to `start` tokens are kept as floats: a short context, whose cache is
    small anyway, keeps full precision and (on a GPU) the fused attention
    kernel. The update that would take the cache past `start` quantizes the
    tokens held and every later one (mlx-lm's `quantized_kv_start`, which
    converts the cache once it holds `start`). mlx-lm's `QuantizedKVCache` is
    the same idea; it is not imported for the reason given at the top of this
    module."""

    def __init__(self, bits: int, group_size: int, start: int = 0):
        super().__init__()
        self.bits, self.group_size, self.start = bits, group_size, start
        self.quantized = False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[Keys, Keys]:
        if not self.quantized and self.offset + keys.shape[2] > self.start:
            self.quantized = True
            if self.offset:
                self.keys, self.values = (self._stored(x) for x in self._first(self.offset))
            else:  # nothing held (or all rolled back): the buffers are made anew
                self.keys = self.values = None
        return super().update_and_fetch(keys, values)

    def _stored(self, x: mx.array) -> Keys:
        return QuantizedTensor(*mx.quantize(x, self.group_size, self.bits)) if self.quantized else x

    def load_state(self, keys: Keys, values: Keys) -> None:
        super().load_state(keys, values)
        self.quantized = isinstance(keys, QuantizedTensor)


class RotatingKVCache:
    """The last `window` keys and values (sliding-window layers), and `extra`
    older ones when reserved (see `reserve`).

    Decoding writes into a ring buffer in place. A chunk of several tokens
    attends over the previous `window - 1` keys plus its own, then the last
    `window + extra` of those are kept. The buffer grows in blocks of `step`
    up to that, so a short conversation does not hold a whole window (26B-A4B:
    50 MB of float32 keys and values for a 128-token prompt otherwise).

    With `extra` slots, a full buffer also takes blocks of up to `extra + 1`
    tokens in place (speculative decoding verifies its drafts so), and `trim`
    drops the last tokens without a copy: the window of the block's first
    token was not overwritten.
    """

    step = 256

    def __init__(self, window: int):
        self.window = window
        self.capacity = window  # window + extra
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        # The valid entries are the `_stored` slots before `_next` (the slot
        # of the next write), oldest first, wrapping round the buffer.
        self._stored = 0
        self._next = 0

    def reserve(self, extra: int) -> None:
        """Keep `extra` positions beyond the window from now on (at least)."""
        if self.capacity >= self.window + extra:
            return
        self.capacity = self.window + extra
        if self.keys is not None:
            self._set_in_order(*self.state)

    def _set_in_order(self, keys: mx.array, values: mx.array) -> None:
        """Keep the last `capacity` of `keys`/`values` (oldest first), from slot 0."""
        self.keys, self.values = self._keep_last(keys), self._keep_last(values)
        self._stored = min(keys.shape[2], self.capacity)
        self._next = self._stored % self.keys.shape[2]

    def _in_order(self, x: mx.array) -> mx.array:
        start = self._next - self._stored
        if start >= 0:
            return x[..., start:self._next, :]
        return mx.concatenate([x[..., start:, :], x[..., : self._next, :]], axis=2)

    def writes_in_place(self, n: int) -> bool:
        """Whether `n` new tokens are written into the buffer (else it is rebuilt)."""
        if self.keys is None:
            return False
        return n == 1 or (self.keys.shape[2] == self.capacity and n - 1 <= self.capacity - self.window)

    def _after_writing(self, n: int) -> Tuple[int, int, int]:
        """`(buffer size, next slot, valid entries)` once `n` tokens are written in place."""
        size = self.keys.shape[2]
        if size < self.capacity and self._next + n > size:  # one token past a buffer still growing
            size = min(-(-(self._next + n) // self.step) * self.step, self.capacity)
        return size, (self._next + n) % self.capacity, min(self._stored + n, size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.writes_in_place(n):
            size, after, stored = self._after_writing(n)
            if size != self.keys.shape[2]:
                self.keys, self.values = self._with_room(self.keys, size), self._with_room(self.values, size)
            for buffer, new in ((self.keys, keys), (self.values, values)):
                first = min(n, size - self._next)
                buffer[..., self._next:self._next + first, :] = new[..., :first, :]
                if first < n:
                    buffer[..., : n - first, :] = new[..., first:, :]
            self._next, self._stored = after, stored
            self.offset += n
            if after == stored:  # the valid slots are a prefix: no mask needed for them
                return self.keys[..., :stored, :], self.values[..., :stored, :]
            return self.keys, self.values
        if self.keys is not None:
            keep = min(self._stored, self.window - 1)
            keys = mx.concatenate([self._in_order(self.keys)[..., self._stored - keep:, :], keys], axis=2)
            values = mx.concatenate([self._in_order(self.values)[..., self._stored - keep:, :], values], axis=2)
        self.offset += n
        self._set_in_order(keys, values)
        # Attention reads the copies kept (or waits for them): else they could
        # run after the whole forward pass, each holding its chunk's Q|K|V
        # buffers until then.
        attended = keys.shape[2]
        if attended <= self.capacity:  # all kept, in order from slot 0
            return self.keys[..., :attended, :], self.values[..., :attended, :]
        return tuple(mx.depends([keys, values], [self.keys, self.values]))

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (at most as many as the last update wrote)."""
        if n == 0:
            return
        self.offset -= n
        self._stored -= n
        self._next = (self._next - n) % self.keys.shape[2]

    def _with_room(self, x: mx.array, positions: int) -> mx.array:
        """`x` in a buffer of at least `positions` slots: the next multiple of
        `step`, at most `capacity`."""
        size = min(-(-positions // self.step) * self.step, self.capacity)
        if x.shape[2] == size:
            return x
        pad = mx.zeros((*x.shape[:2], size - x.shape[2], x.shape[3]), x.dtype)
        return mx.concatenate([x, pad], axis=2)

    def _keep_last(self, x: mx.array) -> mx.array:
        """The last `capacity` positions, in a buffer of their size rounded up to `step`."""
        x = x[..., -self.capacity:, :]
        room = self._with_room(x, x.shape[2])
        # A copy either way: a view would keep alive the whole buffer it was cut
        # from (for a prompt chunk, the projection of every head at every position).
        return mx.contiguous(x) if room is x else room

    def make_mask(self, queries: int) -> Mask:
        if not self.writes_in_place(queries):
            kept = min(self._stored, self.window - 1)
            return _window_mask(queries, self.offset - kept, self.offset, kept + queries, self.window)
        # The slots `update_and_fetch` will return, by the position each holds then.
        size, after, stored = self._after_writing(queries)
        length = stored if after == stored else size
        if queries == 1 and stored <= self.window and length == stored:
            return None  # every returned key is inside the new token's window
        distance = (after - 1 - mx.arange(length)) % size + 1
        position = self.offset + queries - distance
        q = mx.arange(self.offset, self.offset + queries)[:, None]
        return (distance <= stored) & (position <= q) & (position > q - self.window)

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self._in_order(self.keys), self._in_order(self.values)]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def checkpoint(self) -> tuple:
        # Slicing makes new array objects: later in-place writes to the ring
        # buffer leave the checkpoint as it was.
        keys = None if self.keys is None else self.keys[...]
        values = None if self.values is None else self.values[...]
        return keys, values, self.offset, self._stored, self._next

    def restore(self, checkpoint: tuple) -> None:
        keys, values, self.offset, self._stored, self._next = checkpoint
        self.keys = None if keys is None else keys[...]
        self.values = None if values is None else values[...]

    def load_state(self, keys: mx.array, values: mx.array, offset: int) -> None:
        """Keys and values in temporal order (as `state` gives them)."""
        self.offset = offset
        self._set_in_order(keys, values)


KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)
# mlx-lm's and mlx-vlm's default, so their users' commands mean the same here.
DEFAULT_QUANTIZED_KV_START = 5000


def make_cache(config: TextConfig, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
               kv_group_size: int = 64, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START) -> List:
    """One cache per layer that owns K/V (the first `first_kv_shared_layer` layers).

    `max_kv_size` bounds the global layers too: they then keep only the last
    `max_kv_size` tokens (less memory, and the model forgets older context).
    `kv_bits` quantizes the global layers' caches instead (less memory, all
    the context kept) once they hold more than `quantized_kv_start` tokens
    (see `QuantizedKVCache`).
    """
    owners = range(config.first_kv_shared_layer)
    if quantized_kv_start < 0:
        raise ValueError(f"quantized_kv_start must be 0 or more, not {quantized_kv_start}")
    if kv_bits is not None:
        if kv_bits not in KV_BITS or kv_group_size not in KV_GROUP_SIZES:
            raise ValueError(f"KV cache quantization takes bits in {KV_BITS} and a group size in {KV_GROUP_SIZES}, "
                             f"not {kv_bits} and {kv_group_size}")
        if max_kv_size is not None:
            raise ValueError("kv_bits and max_kv_size both shrink the global layers' caches (one by quantizing, "
                             "one by forgetting old tokens); use one of them")
        for width in {config.layer_head_dim(i) for i in owners if not config.is_sliding(i)}:
            if width % kv_group_size:
                raise ValueError(f"a KV group size of {kv_group_size} does not divide the global layers' head dim "
                                 f"{width}; pick one that does")

    def global_cache():
        if kv_bits is not None:
            return QuantizedKVCache(kv_bits, kv_group_size, quantized_kv_start)
        return KVCache() if max_kv_size is None else RotatingKVCache(max_kv_size)

    return [RotatingKVCache(config.sliding_window) if config.is_sliding(i) else global_cache() for i in owners]


def cache_offset(cache: Optional[List]) -> int:
    """Number of tokens already in the cache (the position of the next token)."""
    return cache[0].offset if cache else 0


def attention_masks(
    config: TextConfig, queries: int, cache: Optional[List], vision_blocks: Optional[mx.array] = None
) -> Dict[str, Mask]:
    """The mask of each layer type for `queries` new tokens, built before the
    caches are updated. A sliding layer sees itself and the `sliding_window - 1`
    tokens before it; a global layer sees every earlier token.

    `vision_blocks` ([batch, queries], see `vision_block_ids`) makes each image
    block bidirectional on sliding layers: a token also sees the later tokens
    of its own block. Global layers stay causal, as Gemma 4 was trained.
    """
    masks = {}
    for kind in set(config.layer_types):
        if cache:
            masks[kind] = cache[config.layer_types.index(kind)].make_mask(queries)
        elif kind == SLIDING and queries > config.sliding_window:
            masks[kind] = _window_mask(queries, 0, 0, queries, config.sliding_window)
        else:
            masks[kind] = "causal" if queries > 1 else None
        if kind == SLIDING and vision_blocks is not None and queries > 1:
            # The overlay needs the new keys last, as a rebuilt cache has them (not so a ring written in place).
            if cache and cache[config.layer_types.index(kind)].writes_in_place(queries):
                raise ValueError(f"an image block in a call of only {queries} tokens, with a drafter's room in the "
                                 "caches; feed the image with the text around it, or draft fewer tokens")
            masks[kind] = _with_vision_blocks(masks[kind], vision_blocks)
    return masks


def vision_block_ids(token_types: mx.array) -> mx.array:
    """Per token, the index of the image/video block it belongs to (each maximal
    run of image (1) or video (2) tokens in `token_types` is one block), else -1."""
    is_vision = (token_types == 1) | (token_types == 2)
    previous = mx.concatenate([mx.zeros_like(is_vision[:, :1]), is_vision[:, :-1]], axis=1)
    starts = is_vision & ~previous
    return mx.where(is_vision, mx.cumsum(starts.astype(mx.int32), axis=1) - 1, -1)


def _with_vision_blocks(mask: Mask, blocks: mx.array) -> mx.array:
    """`mask` (causal and windowed; the new tokens are its last columns) plus,
    for every query, the later new tokens of its own vision block. Earlier keys
    of a block need nothing: the causal part already holds them, window limits included."""
    queries = blocks.shape[1]
    if isinstance(mask, str):
        mask = _window_mask(queries, 0, 0, queries, None)
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    later = mx.arange(queries)[None] > mx.arange(queries)[:, None]
    overlay = same & later
    past = mask.shape[-1] - queries
    if past:
        overlay = mx.concatenate([mx.zeros((*overlay.shape[:2], past), dtype=mx.bool_), overlay], axis=-1)
    return (mask | overlay)[:, None]


def save_prompt_cache(path: str, cache: List, tokens: List[int]) -> None:
    """Write caches and the token ids they hold to a safetensors file
    (written to a temporary name, then renamed)."""
    arrays, layout = {}, []
    for i, c in enumerate(cache):
        for name, x in zip(("keys", "values"), c.state):
            if isinstance(x, QuantizedTensor):
                arrays.update({f"{i}.{name}.{field}": a for field, a in zip(x._fields, x)})
            else:
                arrays[f"{i}.{name}"] = x
        entry = {"window": c.window if isinstance(c, RotatingKVCache) else None, "offset": c.offset}
        if isinstance(c, QuantizedKVCache):
            entry.update(bits=c.bits, group_size=c.group_size, start=c.start)
        layout.append(entry)
    metadata = {"layout": json.dumps(layout), "tokens": json.dumps(list(tokens))}
    tmp = Path(str(path) + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata)
    os.replace(tmp, path)


def load_prompt_cache(path: str) -> Tuple[List, List[int]]:
    """Caches and token ids saved by `save_prompt_cache`."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        layout, tokens = json.loads(metadata["layout"]), json.loads(metadata["tokens"])
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a prompt cache saved by mlx_gemma4 ({e})") from None
    def stored(name: str) -> Optional[Keys]:  # as `save_prompt_cache` wrote it, None for an empty cache
        if f"{name}.packed" in arrays:
            return QuantizedTensor(*(arrays[f"{name}.{field}"] for field in QuantizedTensor._fields))
        return arrays.get(name)

    cache = []
    for i, entry in enumerate(layout):
        if entry["window"] is not None:
            c = RotatingKVCache(entry["window"])
        else:
            # Files written before `start` existed quantized from the first token.
            c = QuantizedKVCache(entry["bits"], entry["group_size"], entry.get("start", 0)) if "bits" in entry \
                else KVCache()
        keys, values = stored(f"{i}.keys"), stored(f"{i}.values")
        if keys is not None and entry["window"] is None:
            c.load_state(keys, values)
        elif keys is not None:
            c.load_state(keys, values, entry["offset"])
        cache.append(c)
    return cache, tokens
