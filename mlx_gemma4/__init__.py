"""Gemma 4 on Apple Silicon with MLX."""

from .drafter import load_drafter
from .loader import CheckpointError, load

__all__ = ["load", "load_drafter", "CheckpointError"]
__version__ = "0.1.0"
