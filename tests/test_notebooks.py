"""Every notebook in examples/ runs top to bottom against a tiny random checkpoint, and its figure cells draw.

The notebooks read the checkpoint from ``MLX_GEMMA4_MODEL`` (and their image and audio from ``MLX_GEMMA4_IMAGE`` /
``MLX_GEMMA4_AUDIO``); the kernel inherits this process's environment, and its kernel spec points at this very
interpreter, so it runs with the packages under test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SPEECH = Path(__file__).parent / "fixtures" / "speech.wav"


def test_the_issue_s_notebooks_exist() -> None:
    assert [n.name for n in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_vision.ipynb", "03_audio.ipynb", "04_convert_and_upload.ipynb",
        "05_tools_and_thinking.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} holds outputs; clear them"


@pytest.fixture(scope="module")
def kernel_environment(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables for the kernel: the tiny E2B checkpoint (it has both towers) and its drafter, a local
    image, the speech clip, this interpreter as the python3 kernel, the repository on the import path, the inline
    figure backend, and no Hub access."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("notebooks")
    image = folder / "shapes.png"
    picture = Image.new("RGB", (320, 240), (235, 230, 210))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((30, 40, 150, 160), fill=(200, 40, 40))
    draw.rectangle((180, 90, 290, 200), fill=(40, 80, 200))
    picture.save(image)
    spec = folder / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python",
    }))
    from tiny_checkpoints import build_drafter

    return {
        "MLX_GEMMA4_MODEL": str(tiny_checkpoint("e2b")),
        "MLX_GEMMA4_DRAFTER": str(build_drafter(folder / "drafter", "e2b")),
        "MLX_GEMMA4_IMAGE": str(image),
        "MLX_GEMMA4_AUDIO": str(SPEECH),
        "JUPYTER_PATH": str(folder / "jupyter"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        # Figures render as PNG outputs whatever backend the surrounding environment picks.
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws(path: Path, kernel_environment: dict[str, str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in kernel_environment.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    figures = [cell for cell in notebook.cells if "figure" in cell.metadata.get("tags", [])]
    for cell in figures:
        images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
        assert images, f"{path.name}: the figure cell drew nothing:\n{cell.source}"
    if path.stem in ("02_vision", "03_audio", "04_convert_and_upload"):
        assert figures, f"{path.name} has no cell tagged 'figure'"
