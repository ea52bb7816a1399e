"""Gemma 4 on Apple Silicon with MLX."""

from .loader import CheckpointError, load

__all__ = ["load", "CheckpointError"]
__version__ = "0.1.0"
