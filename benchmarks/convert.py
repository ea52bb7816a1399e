#!/usr/bin/env python
"""Benchmark the converter: wall time and peak RSS of `mlx_gemma4.convert` next to
mlx-vlm's converter, on the same random bfloat16 checkpoint in real Gemma 4 geometry.

The input checkpoints are the ones `benchmarks/checkpoints.py` builds and caches
(`benchmarks/.cache/`, text-only, real widths, `--layers` of them). Each
conversion runs in its own process, so its peak RSS is its own (read with
`os.wait4`). Both quantize to the same bits and group size; ours skips the
quality report here (the report is a separate, optional cost).

    python benchmarks/convert.py                              # e2b 10 layers + 26b-a4b 1 layer, 4-bit
    python benchmarks/convert.py --geometry e2b --layers 10 --skip-mlx-vlm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import ensure_checkpoint, mlx_vlm_view  # noqa: E402  (the random-checkpoint builder)

# Real widths, fewer layers: a 35-layer E2B input is ~10 GB and mlx-vlm's converter
# holds the whole model in memory, too much beside other jobs on a 24 GB machine.
DEFAULT_LAYERS = {"e2b": 10, "26b-a4b": 1}

OURS = (
    "import sys; from convert import convert;"
    "convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=int(sys.argv[3]), q_group_size=int(sys.argv[4]),"
    " report=False, progress=False)"
)
MLX_VLM = (
    "import sys; from mlx_vlm import convert;"
    "convert(sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_bits=int(sys.argv[3]),"
    " q_group_size=int(sys.argv[4]), trust_remote_code=False)"
)


def mlx_vlm_input(src: Path, folder: Path) -> Path:
    """`src` as mlx-vlm's converter can read it (see `checkpoints.mlx_vlm_view`)."""
    mlx_vlm_view(src, folder)
    # mlx-vlm's converter also saves the processor, so it needs tokenizer files;
    # the test suite's tiny tokenizer serves (ids are never looked up).
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import build_tokenizer

    build_tokenizer(folder)
    return folder


def run(code: str, src: Path, out: Path, bits: int, group: int) -> Dict[str, float]:
    """Run one conversion in a child process; its wall time, peak RSS and output size."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(src), str(out), str(bits), str(group)],
                             env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"conversion failed:\n{stderr[-2000:]}")
    ru_maxrss_kib = usage.ru_maxrss  # Linux: KiB (macOS reports bytes)
    peak = ru_maxrss_kib if sys.platform == "darwin" else ru_maxrss_kib * 1024
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"seconds": seconds, "peak_rss_gb": peak / 1e9, "output_gb": size / 1e9}


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", nargs="+", default=list(DEFAULT_LAYERS), choices=list(DEFAULT_LAYERS))
    p.add_argument("--layers", type=int, help="layers of every geometry (default: e2b 10, 26b-a4b 1)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--skip-mlx-vlm", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = []
    for geometry in args.geometry:
        layers = args.layers or DEFAULT_LAYERS[geometry]
        src = ensure_checkpoint(ROOT / "benchmarks" / ".cache", geometry, layers, seed=0)
        input_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
        with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / ".cache") as tmp:
            tools = [("mlx_gemma4.convert", OURS)] + ([] if args.skip_mlx_vlm else [("mlx-vlm convert", MLX_VLM)])
            for tool, code in tools:
                given = src if code is OURS else mlx_vlm_input(src, Path(tmp) / "in")
                result = run(code, given, Path(tmp) / "out", args.bits, args.group_size)
                rows.append({"geometry": f"{geometry} ({layers} layers)", "tool": tool, "input_gb": input_gb,
                             "bits": args.bits, **result})
                print(f"{rows[-1]['geometry']:<22} {tool:<18} {result['seconds']:7.1f} s  "
                      f"peak RSS {result['peak_rss_gb']:6.2f} GB  input {input_gb:.2f} GB  "
                      f"output {result['output_gb']:.2f} GB", flush=True)
    print("\n| geometry | tool | input GB | bits | time s | peak RSS GB | output GB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['tool']} | {r['input_gb']:.2f} | {r['bits']} | {r['seconds']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {r['output_gb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
