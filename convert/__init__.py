"""The Gemma 4 converter: HF or MLX checkpoints → MLX (4/8-bit, mixed, mx float formats).

Packaging: this is a second top-level package next to `mlx_gemma4` (listed in
pyproject.toml), because the project keeps tools apart from the runtime it ships;
`mlx_gemma4/convert.py` is a thin entry that calls `convert.cli.main`, so the
documented command `python -m mlx_gemma4.convert` works after a plain `pip install`
and the runtime package never imports converter code on its own.
"""

from .core import ConvertResult, convert
from .errors import ConvertError
from .hub import upload
from .recipes import RECIPES

__all__ = ["convert", "ConvertError", "ConvertResult", "upload", "RECIPES"]
