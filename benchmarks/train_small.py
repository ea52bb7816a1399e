#!/usr/bin/env python
"""Train small models with the real Gemma 4 layout on offline English text, then
judge conversion recipes on them.

Random weights make quantization look chaotic (a random model flips its top-1
token under 8-bit noise), so recipes are compared on trained models instead:

* `ple`: E2B layout: per-layer embeddings, KV sharing in the last layers,
  sliding/global attention, double-wide MLP in the shared layers;
* `moe`: 26B-A4B layout: 8 experts (top-2) beside the dense MLP, K=V global layers.

The text is what every Linux Python install has offline: the standard library's
docstrings and the license texts under /usr/share/common-licenses. The tokenizer
is the test suite's small Gemma-shaped BPE (byte fallback, real chat template).
Each model trains in a few minutes on two CPU cores and is saved as a normal
checkpoint folder (config.json, safetensors, tokenizer, chat template) under
`benchmarks/.cache/trained-<kind>/`, loadable with `mlx_gemma4.load`.

Then each is converted with our recipes and with mlx-vlm's converter (4-bit,
group 64) and compared with the quality report (mean KL, top-1 agreement, bytes).

    python benchmarks/train_small.py                       # both models, train + judge
    python benchmarks/train_small.py --kind ple --steps 50 # quicker
    python benchmarks/train_small.py --judge-only          # reuse trained models
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from convert import convert  # noqa: E402
from convert.quality import quality_report  # noqa: E402
from mlx_gemma4.config import ModelConfig  # noqa: E402
from mlx_gemma4.generate import generate_tokens  # noqa: E402
from mlx_gemma4.loader import load  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402
from tiny_checkpoints import BASE_SPECIAL_TOKENS, build_tokenizer, token_id, tokenizer  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
SEQ, BATCH = 64, 16


def english_text() -> str:
    """Docstrings of the standard library plus the system's license texts."""
    parts = []
    stdlib = Path(ast.__file__).parent
    for file in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(file.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                # Prose only: skip docstrings that are mostly code or symbols.
                if doc and len(doc) > 80 and sum(c.isalpha() or c.isspace() for c in doc) > 0.85 * len(doc):
                    parts.append(doc)
    for file in sorted(Path("/usr/share/common-licenses").glob("*")):
        if file.is_file():
            parts.append(file.read_text(errors="replace"))
    return "\n\n".join(re.sub(r"[ \t]+", " ", p) for p in parts)


def text_config(kind: str) -> dict:
    """A small text_config in the real layout; widths are multiples of 64 where group size 64 must fit."""
    common = {
        "vocab_size": tokenizer().get_vocab_size(), "hidden_size": 128, "num_attention_heads": 4, "head_dim": 32,
        "global_head_dim": 64, "sliding_window": 32, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
        "tie_word_embeddings": True, "pad_token_id": token_id(BASE_SPECIAL_TOKENS["pad_token"]),
        "bos_token_id": token_id(BASE_SPECIAL_TOKENS["bos_token"]),
        "eos_token_id": token_id(BASE_SPECIAL_TOKENS["eos_token"]), "model_type": "gemma4_text",
    }
    if kind == "ple":
        types = ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]
        return {**common, "num_hidden_layers": 8, "layer_types": types, "intermediate_size": 256,
                "num_key_value_heads": 1, "num_kv_shared_layers": 3, "use_double_wide_mlp": True,
                "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": common["vocab_size"]}
    types = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    return {**common, "num_hidden_layers": 6, "layer_types": types, "intermediate_size": 128,
            # Explicit zeros: mlx-vlm's defaults for these missing fields are E2B's.
            "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
            "num_key_value_heads": 2, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
            "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 128}


def checkpoint_config(kind: str) -> dict:
    # No vision_config/audio_config keys at all: mlx-vlm's parser rejects explicit nulls.
    text = text_config(kind)
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text,
            "tie_word_embeddings": True, "pad_token_id": text["pad_token_id"], "bos_token_id": text["bos_token_id"],
            "eos_token_id": [text["eos_token_id"], token_id("<turn|>")], "dtype": "bfloat16"}


def batches(ids: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - SEQ - 1, BATCH)
        yield mx.array(np.stack([ids[s: s + SEQ + 1] for s in starts]))


def _indices_without_gradient() -> None:
    """MLX cannot take a VJP through the integer expert indices the router gathers
    with (and expert choice has no gradient anyway): cut them from the graph. The
    runtime router never needs this, as it never trains."""
    argpartition = mx.argpartition
    mx.argpartition = lambda *args, **kwargs: mx.stop_gradient(argpartition(*args, **kwargs))


def train(kind: str, steps: int, lr: float, seed: int = 0) -> Path:
    """Train the `kind` model and save it as a checkpoint folder; returns the folder."""
    if kind == "moe":
        _indices_without_gradient()
    text = english_text()
    ids = np.array(tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int32)
    split = int(0.95 * len(ids))
    print(f"[{kind}] corpus: {len(text) / 1e6:.2f} M chars, {len(ids) / 1e6:.2f} M tokens", flush=True)
    mx.random.seed(seed)
    config = checkpoint_config(kind)
    model = Model(ModelConfig.from_dict(config))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[{kind}] {n_params / 1e6:.2f} M parameters", flush=True)

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")

    warmup = min(30, steps // 4)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr / 20)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    train_batches, valid = batches(ids[:split], seed), batches(ids[split:], seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss, grads = step_fn(model, next(train_batches))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 25 == 0 or step == steps:
            val = loss_fn(model, next(valid)).item()
            print(f"[{kind}] step {step}/{steps}  train loss {loss.item():.3f}  valid loss {val:.3f} "
                  f"(ppl {math.exp(val):.1f})  {time.perf_counter() - start:.0f} s", flush=True)
    folder = CACHE / f"trained-{kind}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer(folder)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def sample(folder: Path, prompt: str = "The license", n: int = 40) -> str:
    model, processor = load(folder)
    tokens = generate_tokens(model, mx.array(processor.encode(prompt, add_special_tokens=True)))
    return prompt + processor.decode([int(next(tokens)[0]) for _ in range(n)])


def mlx_vlm_convert(src: Path, out: Path, bits: int, group: int) -> None:
    """mlx-vlm's converter in its own process (it imports transformers and torch)."""
    code = ("import sys; from mlx_vlm import convert; convert(sys.argv[1], mlx_path=sys.argv[2], quantize=True,"
            " q_bits=int(sys.argv[3]), q_group_size=int(sys.argv[4]), trust_remote_code=False)")
    subprocess.run([sys.executable, "-c", code, str(src), str(out), str(bits), str(group)], check=True,
                   cwd=ROOT, capture_output=True)
    # mlx-vlm writes `"vision_config": {}` for a text-only model; mlx_gemma4 reads a
    # present vision_config as "has a vision tower", so drop the empty stub.
    config = json.loads((out / "config.json").read_text())
    config = {k: v for k, v in config.items() if not (k in ("vision_config", "audio_config") and not v)}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def judge(folder: Path, group: int = 64) -> List[Dict]:
    """Quality of every recipe (and mlx-vlm) on the trained model in `folder`."""
    rows = []
    runs = [("ours default 4-bit", {"q_bits": 4}), ("ours mixed 4-bit", {"q_bits": 4, "recipe": "mixed"}),
            ("ours uniform 4-bit", {"q_bits": 4, "recipe": "uniform"}), ("ours default 8-bit", {"q_bits": 8}),
            ("ours mxfp4", {"q_mode": "mxfp4"}), ("mlx-vlm 4-bit", None)]
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for name, options in runs:
            out = Path(tmp) / name.replace(" ", "-")
            if options is None:
                mlx_vlm_convert(folder, out, 4, group)
            else:
                gs = None if "q_mode" in options else group
                convert(folder, out, quantize=True, q_group_size=gs, report=False, progress=False,
                        log=lambda *_: None, **options)
            q = quality_report(folder, out, folder)
            rows.append({"model": folder.name, "conversion": name, **q})
            print(f"{folder.name:<12} {name:<20} KL {q['mean_kl']:.4f}  top-1 {q['top1_agreement_pct']:5.1f}%  "
                  f"{q['disk_bytes'] / 1e6:.2f} MB (input {q['reference_disk_bytes'] / 1e6:.2f} MB)", flush=True)
    return rows


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", nargs="+", default=["ple", "moe"], choices=["ple", "moe"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--judge-only", action="store_true", help="reuse the models trained before")
    p.add_argument("--json", type=Path, help="also write the judged rows here")
    args = p.parse_args(argv)
    rows = []
    for kind in args.kind:
        folder = CACHE / f"trained-{kind}" if args.judge_only else train(kind, args.steps, args.lr)
        print(f"[{kind}] sample: {sample(folder)!r}", flush=True)
        rows += judge(folder)
    print("\n| model | conversion | mean KL | top-1 agreement | MB on disk |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['conversion']} | {r['mean_kl']:.4f} | {r['top1_agreement_pct']:.1f}% | "
              f"{r['disk_bytes'] / 1e6:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
