"""CPU streams: how this package spreads work over the cores, per thread.

MLX's CPU kernels each run on one thread, but every CPU stream has its own
thread: work split over one stream per core runs at once (the products in
`quantized`, the expert gathers in `moe`, the attention heads in `attention`).
MLX streams belong to the thread that made them, so the streams are made per
thread, and a worker thread's MLX state is cleaned up as it ends.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from typing import List, Optional, Tuple

import mlx.core as mx

# Each stream has a dequantized block (or a cast part) in flight: the cap bounds
# that memory on many-core machines (only 2 cores were measured).
MAX_CPU_STREAMS = 8


class _ThreadState:
    """What this package keeps per thread: the CPU streams (MLX streams belong to
    the thread that made them; another thread's raises "There is no Stream(cpu, 1)
    in current thread"), and the clean-up of a worker thread's MLX state."""

    def __init__(self):
        self.ident = threading.get_ident()
        self.worker = threading.current_thread() is not threading.main_thread()
        self.streams: Optional[Tuple[Optional[mx.Stream], ...]] = None

    def __del__(self):
        # Run by a worker thread as it ends (thread-local data dies with its
        # thread). Without it, a process in which a worker thread generated
        # often aborts when it exits, "terminate called without an active
        # exception" (MLX 0.32, Linux: about 1 exit in 2 with the tiny models'
        # compiled kernels, 6 in 6 on the 10-layer E2B; 0 in 12 with this).
        if self.worker and threading.get_ident() == self.ident:
            mx.synchronize()
            mx.clear_streams()


_per_thread = threading.local()


def this_thread() -> _ThreadState:
    """The calling thread's state (made on first use: call it from any thread that
    computes with the model, so that a worker thread cleans up as it ends)."""
    if not hasattr(_per_thread, "state"):
        _per_thread.state = _ThreadState()
    return _per_thread.state


def cpu_streams() -> Tuple[Optional[mx.Stream], ...]:
    """One CPU stream per core this process may use, at most `MAX_CPU_STREAMS`
    (None: the default stream), made for the calling thread."""
    state = this_thread()
    if state.streams is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        state.streams = (None,) + tuple(mx.new_stream(mx.cpu) for _ in range(min(cores, MAX_CPU_STREAMS) - 1))
    return state.streams


def synchronize() -> None:
    """Wait for the work this thread queued: on its default stream and on the CPU
    streams it made."""
    mx.synchronize()
    for stream in (this_thread().streams or (None,))[1:]:
        mx.synchronize(stream)


def on(stream: Optional[mx.Stream]):
    """Make `stream` the default (a compiled function is traced once per stream)."""
    return nullcontext() if stream is None else mx.stream(stream)


def split_points(size: int, parts: int) -> List[int]:
    """Indices that cut `size` rows into `parts` runs of near-equal length (for `mx.split`)."""
    return [size * part // parts for part in range(1, parts)]


def join(parts: List[mx.array], axis: int) -> mx.array:
    """The per-stream results put back together (a lone part is not copied)."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)
