"""Command line: `python -m mlx_gemma4.convert --hf-path ID_OR_DIR --mlx-path OUT [-q] …`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mlx_gemma4.loader import CheckpointError

from .core import DTYPES, convert
from .errors import ConvertError
from .recipes import GROUP_SIZES, MODES, RECIPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_gemma4.convert",
        description="Convert a Gemma 4 checkpoint (HF or MLX layout) to MLX, optionally quantized, "
        "with a quality report; optionally upload it to the Hugging Face Hub.",
    )
    p.add_argument("--hf-path", required=True, help="input: a local folder or a Hub repo id")
    p.add_argument("--mlx-path", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (implied by --q-bits/--q-mode/--recipe)")
    p.add_argument("--q-bits", type=int,
                   help="bits of the quantized body (default 4; the recipe says which are allowed)")
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, help="affine group size (default 64)")
    p.add_argument("--q-mode", choices=MODES, help="affine (default) or an mx float format")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    p.add_argument("--dtype", choices=DTYPES, help="float type of the text weights (default: the input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 200KB")
    p.add_argument("--no-report", action="store_true",
                   help="skip the quality report (it loads the input and the output one after the other)")
    p.add_argument("--upload-repo", help="ORG/NAME on the Hugging Face Hub to upload the result to")
    p.add_argument("--dry-run", action="store_true",
                   help="convert, then list what would be uploaded and print the model card instead of uploading")
    p.add_argument("--revision", help="Hub revision of the input")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the converter; returns the exit status (2 on a conversion error)."""
    args = _parser().parse_args(argv)
    try:
        convert(
            args.hf_path, args.mlx_path,
            quantize=args.quantize or any(v is not None for v in (args.q_bits, args.q_mode, args.recipe)),
            q_bits=args.q_bits, q_group_size=args.q_group_size, q_mode=args.q_mode or "affine",
            recipe=args.recipe or "default", dtype=args.dtype, upload_repo=args.upload_repo,
            dry_run=args.dry_run, revision=args.revision, force=args.force,
            max_shard_size=args.max_shard_size, report=not args.no_report,
        )
    except (ConvertError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
