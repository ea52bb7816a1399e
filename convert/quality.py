"""Quality report: the converted model against the unquantized input, on fixed prompts.

For every position of every calibration prompt both models give a next-token
distribution; the report gives the mean KL(reference ‖ converted), the top-1
agreement, and the sizes. The two models are loaded one after the other, so peak
memory is the larger of them, not their sum.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma4.loader import load_model
from mlx_gemma4.processor import Processor

# Fixed, varied English text: prose, dialogue, code, numbers, a list.
CALIBRATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into",
    "Q: What is the capital of France?\nA: The capital of France is Paris. Q: And of Italy?\nA:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, three astronauts flew to the Moon. Two of them walked on its surface for about two hours.",
    "Shopping list: eggs, milk, bread, two apples, a bag of rice, olive oil, and fresh basil for the sauce.",
    "Dear team, thank you all for your hard work this quarter. Our sales grew by twelve percent, and",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his clever daughter.",
)


def _log_probs(folder: Path, prompts: List[List[int]]) -> List[np.ndarray]:
    model = load_model(folder)
    out = []
    for ids in prompts:
        logits = model(mx.array([ids]))[0].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    del model
    gc.collect()
    mx.clear_cache()
    return out


def _memory_bytes(folder: Path) -> int:
    model = load_model(folder, lazy=True)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def safetensors_bytes(folder: Path) -> int:
    """Bytes of all weight files in `folder`."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def quality_report(reference: Path, converted: Path, tokenizer_folder: Path) -> Dict[str, float]:
    """Compare `converted` against `reference` (both checkpoint folders) on the calibration prompts."""
    processor = Processor.from_pretrained(tokenizer_folder)
    prompts = [processor.encode(p, add_special_tokens=True) for p in CALIBRATION_PROMPTS]
    ref = _log_probs(reference, prompts)
    got = _log_probs(converted, prompts)
    kl = np.concatenate([(np.exp(r) * (r - g)).sum(axis=-1) for r, g in zip(ref, got)])
    agree = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])
    return {
        "prompts": len(prompts),
        "positions": int(kl.size),
        # Rounding error can make a near-zero KL slightly negative; it is >= 0 by definition.
        "mean_kl": float(max(kl.mean(), 0.0)),
        "max_kl": float(max(kl.max(), 0.0)),
        "top1_agreement_pct": float(100.0 * agree.mean()),
        "reference_disk_bytes": safetensors_bytes(reference),
        "disk_bytes": safetensors_bytes(converted),
        "memory_bytes": _memory_bytes(converted),
    }


def human_bytes(n: float) -> str:
    """'812 KiB', '1.13 MiB', '3.21 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(report: Dict[str, float]) -> str:
    """Human-readable summary lines."""
    return (
        f"quality vs unquantized input ({report['prompts']} prompts, {report['positions']} positions): "
        f"mean KL {report['mean_kl']:.4g} nats, max KL {report['max_kl']:.4g}, "
        f"top-1 agreement {report['top1_agreement_pct']:.1f}%\n"
        f"size on disk {human_bytes(report['disk_bytes'])} (input {human_bytes(report['reference_disk_bytes'])}), "
        f"model in memory {human_bytes(report['memory_bytes'])}"
    )
