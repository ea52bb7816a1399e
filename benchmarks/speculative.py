"""Speculative decoding with the MTP drafter: what a round costs on this machine,
and the bytes read per token, the proxy for a Mac.

    python benchmarks/speculative.py                 # E2B (10 layers, 4-bit) + the E2B drafter, k = 3
    python benchmarks/speculative.py --skip-mlx-vlm --draft-tokens 2 4

Random weights cannot predict each other, so a random drafter is (almost)
never accepted. The rounds are therefore also timed with an oracle that drafts
the target's own greedy continuation (every draft accepted): the best case of
this backend. Both runtimes load the same 4-bit target (from `bench.py`'s
cache) and the same random bfloat16 drafter in the released E2B drafter
geometry, and decode greedily after the same prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import islice
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import converted, random_prompt, weight_bytes_per_token  # noqa: E402
from checkpoints import GB, ensure_checkpoint, ensure_drafter, log, machine, mlx_vlm_view  # noqa: E402

from mlx_gemma4 import speculative  # noqa: E402
from mlx_gemma4.drafter import load_drafter  # noqa: E402
from mlx_gemma4.generate import generate_tokens  # noqa: E402
from mlx_gemma4.loader import load_model  # noqa: E402

ACCEPTANCE_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def timed_tokens(stream, n: int) -> tuple:
    """The first token (untimed: prefill) and the rate of the next `n`."""
    first = next(stream)[0]
    start = time.perf_counter()
    tokens = [t for t, _ in islice(stream, n)]
    seconds = time.perf_counter() - start
    stream.close()
    mx.synchronize()
    return [first] + tokens, n / seconds


def oracle(reference: List[int], prompt_length: int):
    """`speculative.propose` replaced by the reference continuation."""
    def propose(drafter, model, last, hidden, shared, position, k):
        start = position - prompt_length + 1
        return mx.array((reference[start:start + k] + [0] * k)[:k])
    return propose


def drafter_bytes_per_step(drafter) -> int:
    """Parameter bytes one draft step reads in bfloat16 (as stored, and as a GPU
    computes): all but the embedding table, of which a clustered head reads its
    candidates' rows (a dense head: all)."""
    config, total = drafter.config, 0
    for name, p in tree_flatten(drafter.parameters()):
        if name == "model.embed_tokens.weight" and config.use_ordered_embeddings:
            rows = config.centroid_intermediate_top_k * config.text_config.vocab_size // config.num_centroids
            total += 2 * rows * p.shape[1]
        elif name != "masked_embedding.token_ordering":
            total += 2 * p.size
    return total


def component_times(model, drafter, prompt: mx.array, k: int, repeats: int = 3) -> tuple:
    """Seconds of one draft step, one k + 1 token verifying pass and one decode step."""
    cache = model.make_cache()
    target_kv = speculative.DrafterKV(model, drafter, cache, k)
    list(islice(generate_tokens(model, prompt, cache=cache), 1))
    last = mx.array([1])
    hidden = mx.zeros((1, 1, model.config.text_config.hidden_size), mx.float32)
    best = [float("inf")] * 3
    for _ in range(repeats):
        start = time.perf_counter()
        drafts = speculative.propose(drafter, model, last, hidden, target_kv.shared(), cache[0].offset, k)
        best[0] = min(best[0], (time.perf_counter() - start) / k)
        for i, block in ((1, mx.concatenate([last, drafts])), (2, last)):
            start = time.perf_counter()
            mx.eval(model(block[None], cache))
            best[i] = min(best[i], time.perf_counter() - start)
            for c in cache:
                c.trim(block.size)
    return tuple(best)


def run_ours(folder: Path, drafter_folder: Path, prompt: mx.array, n: int, ks: Sequence[int]) -> dict:
    model = load_model(folder, text_only=True)
    drafter = load_drafter(drafter_folder, model)
    plain, plain_rate = timed_tokens(generate_tokens(model, prompt), n)
    out = {"plain_tok_s": plain_rate, "tokens": plain, "by_k": {},
           "target_bytes": weight_bytes_per_token(model, model.config.text_config),
           "drafter_bytes": drafter_bytes_per_step(drafter)}
    for k in ks:
        stats = {}
        tokens, rate = timed_tokens(speculative.speculative_tokens(model, drafter, prompt, draft_tokens=k,
                                                                   stats=stats), n)
        real = speculative.propose
        speculative.propose = oracle(plain, prompt.size)
        try:
            oracle_tokens, oracle_rate = timed_tokens(
                speculative.speculative_tokens(model, drafter, prompt, draft_tokens=k), n)
        finally:
            speculative.propose = real
        draft_s, verify_s, step_s = component_times(model, drafter, prompt, k)
        out["by_k"][k] = {"tok_s": rate, "acceptance": stats["accepted"] / max(stats["drafted"], 1),
                          "same_tokens": tokens == plain and oracle_tokens == plain,
                          "oracle_tok_s": oracle_rate, "draft_step_s": draft_s, "verify_s": verify_s,
                          "decode_step_s": step_s}
        log(f"ours k={k}: {out['by_k'][k]}")
    return out


def run_mlx_vlm(folder: Path, drafter_folder: Path, prompt: mx.array, n: int, k: int) -> dict:
    from mlx_vlm.generate import generate_step
    from mlx_vlm.speculative.drafters import load_drafter as vlm_load_drafter
    from mlx_vlm.utils import load_model as vlm_load_model

    model = vlm_load_model(folder, lazy=False)
    drafter, kind = vlm_load_drafter(str(drafter_folder))

    def stream(**draft):
        steps = generate_step(prompt[None], model, None, None, max_tokens=n + 1, temperature=0.0, **draft)
        return ((int(token), None) for token, _ in steps)

    plain, plain_rate = timed_tokens(stream(), n)
    tokens, rate = timed_tokens(stream(draft_model=drafter, draft_kind=kind, draft_block_size=k + 1), n)
    return {"plain_tok_s": plain_rate, "tok_s": rate, "tokens": plain, "same_tokens": tokens == plain}


def proxy_table(target: int, drafter: int, ks: Sequence[int]) -> List[str]:
    """Bytes read per emitted token relative to plain decoding, if every draft is
    accepted with probability `a` independently: a round reads the target once
    and the drafter k times and emits (1 - a^(k+1)) / (1 - a) tokens."""
    lines = ["| drafts k | " + " | ".join(f"a = {a}" for a in ACCEPTANCE_RATES) + " |",
             "|---|" + "---|" * len(ACCEPTANCE_RATES)]
    for k in ks:
        cells = []
        for a in ACCEPTANCE_RATES:
            emitted = (1 - a ** (k + 1)) / (1 - a)
            cells.append(f"{emitted * target / (target + k * drafter):.2f}x")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=10, help="E2B decoder layers kept (default 10)")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[3], help="drafts per round (default 3)")
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=12, help="tokens timed after the first")
    p.add_argument("--skip-mlx-vlm", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    folder = converted(ensure_checkpoint(args.cache_dir, "e2b", args.layers, args.seed), 4, 64, "uniform")
    drafter_folder = ensure_drafter(args.cache_dir, args.seed)
    prompt = random_prompt(args.prompt_length, 262144, args.seed)
    ours = run_ours(folder, drafter_folder, prompt, args.decode_tokens, args.draft_tokens)
    lines = [f"machine: {machine()}", "",
             f"E2B {args.layers} layers 4-bit, drafter bf16 (E2B geometry), prompt {args.prompt_length}, "
             f"{args.decode_tokens} greedy tokens timed", "",
             "| runtime | k | plain tok/s | drafter tok/s | accepted | oracle tok/s (all accepted) | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for k, r in ours["by_k"].items():
        lines.append(f"| mlx_gemma4 | {k} | {ours['plain_tok_s']:.2f} | {r['tok_s']:.2f} | {100 * r['acceptance']:.0f} % "
                     f"| {r['oracle_tok_s']:.2f} | {r['same_tokens']} |")
    if not args.skip_mlx_vlm:
        k = args.draft_tokens[0]
        with __import__("tempfile").TemporaryDirectory() as tmp:
            try:
                vlm = run_mlx_vlm(mlx_vlm_view(folder, Path(tmp) / "t"), drafter_folder, prompt,
                                  args.decode_tokens, k)
                agree = sum(a == b for a, b in zip(vlm["tokens"], ours["tokens"]))
                lines.append(f"| mlx-vlm | {k} | {vlm['plain_tok_s']:.2f} | {vlm['tok_s']:.2f} | – | – | "
                             f"{vlm['same_tokens']} (plain: {agree}/{len(ours['tokens'])} equal to ours) |")
            except Exception as e:  # report, do not lose our figures
                lines.append(f"| mlx-vlm | {k} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
    lines += ["", "Per round (best of 3, ours):", "",
              "| k | draft step ms | verify pass (k + 1 tokens) ms | decode step ms | verify / step |", "|---|---|---|---|---|"]
    for k, r in ours["by_k"].items():
        lines.append(f"| {k} | {1e3 * r['draft_step_s']:.0f} | {1e3 * r['verify_s']:.0f} | {1e3 * r['decode_step_s']:.0f} "
                     f"| {r['verify_s'] / r['decode_step_s']:.2f} |")
    lines += ["", f"Bytes read: target {ours['target_bytes'] / GB:.3f} GB per pass (4-bit), drafter "
              f"{ours['drafter_bytes'] / 1e6:.1f} MB per draft step (bfloat16). Bytes per emitted token, plain / speculative "
              "(the speed-up of a bandwidth-bound decode, verifying k + 1 tokens as fast as one):", ""]
    lines += proxy_table(ours["target_bytes"], ours["drafter_bytes"], args.draft_tokens)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
