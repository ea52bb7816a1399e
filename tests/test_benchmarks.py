"""The benchmark's quick mode runs end to end, so it cannot rot.

It builds (or reuses, from benchmarks/.cache) random real-geometry checkpoints,
converts them with our converter and times mlx_gemma4 and mlx-vlm on them; the
figures themselves are not checked, only that both runtimes produced them.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_times_both_runtimes_on_every_geometry(tmp_path):
    out = tmp_path / "quick.json"
    run = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["geometry"], r["runtime"]) for r in results} == {
        (g, rt) for g in ("e2b", "26b-a4b") for rt in ("mlx_gemma4", "mlx_vlm")}
    for r in results:
        figures = [r["decode_tok_s"], r["run_peak_gb"], r["ceiling_share"], *r["ttft_s"].values()]
        assert all(math.isfinite(x) and x > 0 for x in figures), r
        assert len(r["tokens"]) == 4  # the first token and 3 decoded
    header = run.stdout.splitlines()[0]
    assert "mlx_gemma4" in header and "mlx-vlm" in header and "ratio" in header


def test_long_context_benchmark_times_both_runtimes_over_filled_caches(tmp_path):
    """On the quick run's 26B-A4B checkpoint (cached): float and 8-bit caches filled with 64 tokens, both runtimes."""
    out = tmp_path / "long.json"
    run = subprocess.run([sys.executable, "benchmarks/bench.py", "--geometry", "26b-a4b", "--layers", "1",
                          "--prompt-lengths", "4", "--decode-tokens", "2", "--long-context", "64", "--kv-bits", "8",
                          "--follow-up-tokens", "4", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in json.loads(out.read_text())["results"]:
        runs = {(x["context"], x["kv_bits"]): x for x in r["long_context"]}
        assert set(runs) == {(4, None), (64, None), (64, 8)}, r["runtime"]
        assert all(x["tok_s"] > 0 and x["follow_up_s"] > 0 for x in runs.values())
        # Quantized: smaller caches than the float ones of the same length.
        assert runs[(64, 8)]["kv_cache_gb"] < runs[(64, None)]["kv_cache_gb"], r["runtime"]
    assert "decode tok/s, 64 cached, 8-bit caches" in run.stdout


def test_speculative_benchmark_runs_both_runtimes():
    run = subprocess.run([sys.executable, "benchmarks/speculative.py", "--layers", "6", "--prompt-length", "8",
                          "--decode-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| mlx")}
    # Each runtime's stream with the drafter equals its stream without.
    assert rows["mlx_gemma4"].rstrip(" |").endswith("True"), rows
    assert "| True (plain:" in rows["mlx-vlm"], rows


def test_media_prefill_benchmark_runs_both_ways(tmp_path):
    """On the quick run's 26B-A4B checkpoint (built above, cached): chunks around an image block, then one call."""
    out = tmp_path / "media.json"
    run = subprocess.run([sys.executable, "benchmarks/media_prefill.py", "--geometry", "26b-a4b", "--layers", "1",
                          "--images", "2", "--image-tokens", "16", "--prefill-chunk", "24", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    chunked, whole = json.loads(out.read_text())["results"]
    assert (chunked["chunk"], whole["chunk"]) == (24, None) and chunked["tokens"] == whole["tokens"] == 2 * 42 + 24
    assert all(r["seconds"] > 0 and r["peak_gb"] > 0 for r in (chunked, whole))
    assert "peak GB above the weights" in run.stdout
