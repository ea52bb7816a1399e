"""Hardware-independent decode efficiency: primitives and bytes per decode step.

On Metal a decode step is bound by kernel launches (one per primitive) and by
the bytes it reads, not by this machine's CPU speed. So for mlx_gemma4 and
mlx-vlm, on the same random 4-bit model of each real geometry (real widths and
expert counts, fewer layers), this prints:

- primitives: nodes in the lazy graph of one greedy decode step (logits and the
  argmax), counted from `mx.export_to_dot`; `compiled` counts one fused kernel
  per compiled block as one primitive, as Metal runs it;
- weights read: bytes of the parameters that step reads (a lookup table counts
  one row, an expert stack top_k of num_experts), against the minimum: the
  packed 4-bit weights with 16-bit scales, each read once.

Both models compute in bfloat16 here (the checkpoint's dtype, which is what
the device policy picks on a GPU), and ours takes its GPU route where the
layers branch on the backend (`precision.cpu_backend`). Usage:

    python benchmarks/graph.py [--geometry e2b 26b-a4b 31b] [--layers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoints import GEOMETRIES, cut_layers, real_text_config  # noqa: E402
from mlx_gemma4 import precision  # noqa: E402
from mlx_gemma4.config import ModelConfig  # noqa: E402
from mlx_gemma4.fusion import fuse  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402
from mlx_gemma4.quantized import use_cpu_routes  # noqa: E402

LAYERS = {"e2b": 7, "26b-a4b": 2, "31b": 2}
CONTEXT = 64  # tokens in the cache when the step is built
GRAPH_VOCAB = 4096  # the vocabulary does not change the graph, only the LM head's size
BITS, GROUP = 4, 64


def text_config(geometry: str, layers: int, vocab: Optional[int] = None) -> dict:
    text = cut_layers(real_text_config(geometry), layers)
    if vocab:
        text = {**text, "vocab_size": vocab, "vocab_size_per_layer_input": vocab}
    return text


def _quantizable(path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and "router" not in path and module.weight.shape[-1] % GROUP == 0


def ours(text: dict) -> nn.Module:
    model = Model(ModelConfig.from_dict({"model_type": "gemma4", "text_config": text,
                                         "vision_config": None, "audio_config": None}))
    nn.quantize(model, group_size=GROUP, bits=BITS, class_predicate=_quantizable)
    use_cpu_routes(model)  # the loader's layer classes (on a GPU they add no op)
    # As the loader does: the stored bfloat16, then the device policy's casts.
    model.set_dtype(mx.bfloat16)
    params = precision.cast_weights(dict(tree_flatten(model.parameters())), mx.bfloat16, text["tie_word_embeddings"])
    model.load_weights(list(params.items()))
    model.language_model.model.compute_dtype = mx.bfloat16
    return model


def theirs(text: dict) -> nn.Module:
    from mlx_vlm.models.gemma4.config import TextConfig
    from mlx_vlm.models.gemma4.language import LanguageModel

    model = LanguageModel(TextConfig.from_dict(text))
    nn.quantize(model, group_size=GROUP, bits=BITS, class_predicate=_quantizable)
    model.set_dtype(mx.bfloat16)
    return model


def _logits(model: nn.Module, tokens: mx.array, cache: list) -> mx.array:
    out = model(tokens, cache=cache)
    return getattr(out, "logits", out)


# Primitives that launch no kernel on Metal: views when their input is contiguous,
# and StopGradient (it shares its input's buffer).
VIEWS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Transpose", "Slice", "Split", "Flatten", "Unflatten",
         "StopGradient"}
# Ops that Metal runs as one kernel and the CPU backend builds from ~10-30 primitives.
FAST = ((mx.fast, "rms_norm"), (mx.fast, "rope"), (mx.fast, "scaled_dot_product_attention"), (mx, "dequantize"))


def _labels(*outputs: mx.array) -> Counter:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', f.read()))


def _kernels(counts: Counter) -> int:
    return sum(n for label, n in counts.items() if label not in VIEWS)


@contextmanager
def fast_op_census(found: list):
    """Record, for every call of a `FAST` op, the primitives its CPU fallback
    adds to the graph (the op on fresh inputs of the same shapes)."""
    originals = {(space, name): getattr(space, name) for space, name in FAST}

    def wrap(name, fn):
        def call(*args, **kwargs):
            fresh = [mx.zeros_like(a) if isinstance(a, mx.array) else a for a in args]
            fresh_kw = {k: mx.zeros_like(v) if isinstance(v, mx.array) else v for k, v in kwargs.items()}
            mx.eval([a for a in fresh if isinstance(a, mx.array)], [v for v in fresh_kw.values() if isinstance(v, mx.array)])
            found.append((name, _labels(fn(*fresh, **fresh_kw))))
            return fn(*args, **kwargs)
        return call

    for (space, name), fn in originals.items():
        setattr(space, name, wrap(name, fn))
    try:
        yield
    finally:
        for (space, name), fn in originals.items():
            setattr(space, name, fn)


def count_step(model: nn.Module) -> dict:
    """Primitive counts of one greedy decode step after a CONTEXT-token prefill:
    all graph nodes, and the Metal kernel proxy (non-view nodes, each `mx.fast`
    call as one kernel)."""
    cache = model.make_cache()
    mx.eval(_logits(model, mx.arange(1, CONTEXT + 1)[None], cache))
    mx.eval([c.state for c in cache])
    fast: list = []
    on_cpu, precision.cpu_backend = precision.cpu_backend, lambda: False  # build the layers' GPU route
    try:
        with fast_op_census(fast):
            out = mx.argmax(_logits(model, mx.array([[7]]), cache)[:, -1], axis=-1)
    finally:
        precision.cpu_backend = on_cpu
    counts = _labels(out)
    mx.eval(out)
    kernels = Counter({k: n for k, n in counts.items() if k not in VIEWS})
    for name, inner in fast:
        kernels.subtract(inner)
        kernels["fast:" + name] += 1
    kernels = +kernels  # drops the view labels subtracted to zero or below
    return {"primitives": sum(counts.values()), "kernels": sum(kernels.values()), "fast_calls": len(fast),
            "kernels_by_kind": dict(kernels.most_common()), "by_kind": dict(counts.most_common())}


def weight_bytes(model: nn.Module, text: dict) -> Dict[str, int]:
    """Bytes of parameters one decode step reads, and the 4-bit minimum."""
    read = minimum = 0
    for name, p in tree_flatten(model.parameters()):
        n = p.nbytes
        lookup = "embed_tokens_per_layer" in name or ("embed_tokens" in name and not text["tie_word_embeddings"])
        if lookup:
            n //= p.shape[0]
        elif "experts" in name:
            n = n * text["top_k_experts"] // text["num_experts"]
        read += n
        floats = p.dtype not in (mx.uint32, mx.uint8)
        # Minimum: scales/biases and float tensors in 16 bits.
        minimum += n * 2 // p.dtype.size if floats else n
    return {"read": read, "minimum": minimum}


def measure(geometry: str, layers: int, fused: bool = True) -> dict:
    small = text_config(geometry, layers, GRAPH_VOCAB)
    full = text_config(geometry, layers)
    row = {"geometry": geometry, "layers": layers}
    for side, build in (("mlx_gemma4", ours), ("mlx_vlm", theirs)):
        model = build(small)
        if side == "mlx_gemma4" and fused:
            fuse(model)
        mx.eval(model.parameters())
        row[side] = count_step(model)
        del model
        lazy = build(full)  # never evaluated: only shapes are read
        if side == "mlx_gemma4" and fused:
            fuse(lazy)
        row[side].update(weight_bytes(lazy, full))
    row["ratio"] = row["mlx_gemma4"]["kernels"] / row["mlx_vlm"]["kernels"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", nargs="+", default=list(LAYERS), choices=list(GEOMETRIES))
    p.add_argument("--layers", type=int, default=None, help="layers per geometry (default: %s)" % LAYERS)
    p.add_argument("--unfused", action="store_true", help="skip our load-time fusion (to measure it)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    print("| geometry | layers | kernels ours | mlx-vlm | ratio | graph nodes (CPU) ours | mlx-vlm "
          "| weights read ours | mlx-vlm | 4-bit minimum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for geometry in args.geometry:
        row = measure(geometry, args.layers or LAYERS[geometry], fused=not args.unfused)
        rows.append(row)
        a, b = row["mlx_gemma4"], row["mlx_vlm"]
        print(f"| {geometry} | {row['layers']} | {a['kernels']} | {b['kernels']} | {row['ratio']:.2f} | "
              f"{a['primitives']} | {b['primitives']} | "
              f"{a['read'] / 1e6:.1f} MB | {b['read'] / 1e6:.1f} MB | {a['minimum'] / 1e6:.1f} MB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
