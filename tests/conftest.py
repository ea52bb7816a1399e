"""Shared fixtures: tiny random Gemma 4 checkpoints and their transformers reference models.

torch and transformers are imported lazily, inside the fixtures, so tests that use neither stay fast and run
without them installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_checkpoint("e2b", dtype=..., max_shard_size=..., with_towers=..., sliding_window=...,
    seed=...)`` returns the folder of that tiny checkpoint, built once per distinct argument set per session."""
    pytest.importorskip("transformers")
    from tiny_checkpoints import build_checkpoint

    built: dict[tuple[Any, ...], Path] = {}

    def get(
        variant: str,
        *,
        dtype: str = "float32",
        max_shard_size: int | str | None = None,
        with_towers: bool = True,
        sliding_window: int = 16,
        seed: int = 0,
    ) -> Path:
        key = (variant, dtype, max_shard_size, with_towers, sliding_window, seed)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{variant}-{dtype}-{'towers' if with_towers else 'text'}")
            built[key] = build_checkpoint(
                folder, variant, dtype=dtype, max_shard_size=max_shard_size, seed=seed,
                sliding_window=sliding_window, with_towers=with_towers,
            )
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_model() -> Callable[[str | Path], Any]:
    """Factory: ``hf_model(path)`` is the transformers ``Gemma4ForConditionalGeneration`` of that checkpoint,
    float32, eval mode, eager attention; loaded once per path per session."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    loaded: dict[Path, Any] = {}

    def get(path: str | Path) -> Any:
        path = Path(path)
        if path not in loaded:
            loaded[path] = transformers.Gemma4ForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        return loaded[path]

    return get
