"""`python -m mlx_gemma4.convert`: the converter's documented entry point.

The converter itself is the top-level `convert` package (installed alongside
`mlx_gemma4`, see its docstring for why); this module only re-exports its API and
runs its CLI, so `import mlx_gemma4` alone never loads converter code.
"""

import sys

from convert import ConvertError, ConvertResult, convert, upload
from convert.cli import main

__all__ = ["convert", "ConvertError", "ConvertResult", "upload", "main"]

if __name__ == "__main__":
    sys.exit(main())
