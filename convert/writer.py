"""Writing the output: safetensors shards of bounded size, their index, and an
all-or-nothing output folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import mlx.core as mx

from .errors import ConvertError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'5GB', '200KB', '1GiB' or a plain byte count → bytes."""
    value = str(text).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].strip():
            number = value[: -len(unit)].strip()
            break
    else:
        unit, number = "B", value
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ConvertError(f"cannot read shard size '{text}'; write e.g. 5GB or 200KB") from None
    if size <= 0:
        raise ConvertError(f"shard size must be positive, got '{text}'")
    return size


class ShardWriter:
    """Collects evaluated tensors and writes a shard whenever the next group would
    overflow `max_bytes`; only one shard's worth of output is ever held in memory.
    A module's weight, scales and biases are added as one group and share a shard."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self._pending: Dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, group: Dict[str, mx.array]) -> None:
        mx.eval(list(group.values()))
        size = sum(a.nbytes for a in group.values())
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending.update(group)
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        _write(self.folder / f"shard-{index:05d}.tmp.safetensors", self._pending)
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard, give every shard its final name and write the index; returns the shard names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self._shards)):
            os.replace(self.folder / f"shard-{i:05d}.tmp.safetensors", self.folder / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        return names


def _write(path: Path, arrays: Dict[str, mx.array]) -> None:
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"cannot write {path.name} in {path.parent}: {e}") from None


def write_text(path: Path, text: str) -> None:
    """Write a small text file, turning an OS failure into a one-line ConvertError."""
    try:
        path.write_text(text)
    except OSError as e:
        raise ConvertError(f"cannot write {path}: {e}") from None


def check_output_path(out: Path, force: bool, source: Path) -> None:
    """Refuse an existing OUT (unless `force`) and an OUT that is the source itself."""
    if out.exists() and out.resolve() == source.resolve():
        raise ConvertError(f"{out} is the input checkpoint; choose another --mlx-path")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out` (replacing
    it if `force`), on any failure or interrupt it is deleted and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not force:
                raise ConvertError(f"{out} already exists; pass --force to replace it")
            # Move the old folder aside first so a failure never leaves neither.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
