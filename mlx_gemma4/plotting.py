"""Figures for the example notebooks: image token budgets, audio features, converter quality.

matplotlib is imported only when a figure is drawn (``pip install "mlx-gemma4[notebooks]"``); the runtime never
needs it. Every function returns the ``matplotlib.figure.Figure`` it drew, created through pyplot so that Jupyter
shows it under the cell.
"""

from __future__ import annotations

import textwrap
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from .audio_features import AudioFeatureExtractor, AudioInput, prepare_audio
from .image_processing import SUPPORTED_BUDGETS, ImageProcessor, load_image, target_size, to_rgb


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "mlx_gemma4.plotting needs matplotlib: pip install 'mlx-gemma4[notebooks]' (or pip install matplotlib)"
        ) from None
    return plt


def plot_patch_grids(
    image: Any,
    image_processor: ImageProcessor,
    budgets: Sequence[int] = SUPPORTED_BUDGETS,
    captions: Optional[Mapping[int, str]] = None,
) -> Any:
    """The image as the vision encoder sees it at each of ``budgets``: resized as the processor resizes it, with
    the grid of soft tokens (each ``pooling_kernel_size``² patches) drawn over it and the token count in the title.

    ``image`` is anything ``load_image`` takes; ``captions`` maps a budget to text shown under its panel (e.g. the
    model's answer at that budget).
    """
    plt = _pyplot()
    picture = to_rgb(load_image(image))
    side = image_processor.patch_size * image_processor.pooling_kernel_size
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.2 * len(budgets), 3.9), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        height, width = target_size(picture.height, picture.width, image_processor.patch_size,
                                    image_processor.pooling_kernel_size, budget)
        ax.imshow(np.asarray(picture.resize((width, height), resample=image_processor.resample)))
        rows, cols = height // side, width // side
        line = max(0.2, 1.2 - 0.03 * max(rows, cols))
        for x in range(1, cols):
            ax.axvline(x * side - 0.5, color="white", linewidth=line, alpha=0.8)
        for y in range(1, rows):
            ax.axhline(y * side - 0.5, color="white", linewidth=line, alpha=0.8)
        ax.set_title(f"budget {budget}: {rows * cols} tokens\n{cols}×{rows} grid, {width}×{height} px", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if captions and budget in captions:
            ax.set_xlabel(textwrap.fill(_shorten(captions[budget], 105), 35), fontsize=8)
    fig.tight_layout()
    return fig


def plot_audio(audio: AudioInput, extractor: AudioFeatureExtractor) -> Any:
    """The waveform of ``audio`` (a path, ``(samples, rate)`` or samples at the extractor's rate), resampled as the
    model gets it, above the log-mel features the audio encoder reads; the title gives the soft-token count."""
    plt = _pyplot()
    rate = extractor.sampling_rate
    samples = prepare_audio(audio, rate)
    features, mask = extractor([samples[: extractor.max_samples]])
    frames = int(mask[0].sum())
    seconds = len(samples) / rate
    fig, (wave, mel) = plt.subplots(2, 1, figsize=(10, 5.5), gridspec_kw={"height_ratios": [1, 2]})
    wave.plot(np.arange(len(samples)) / rate, samples, linewidth=0.5)
    wave.set_xlim(0, seconds)
    wave.set_ylabel("amplitude")
    wave.set_title(f"{seconds:.2f} s at {rate} Hz → {frames} mel frames → "
                   f"{extractor.num_audio_tokens(len(samples))} audio tokens")
    hop = extractor.hop_length / rate
    shown = mel.imshow(features[0, :frames].T, origin="lower", aspect="auto", cmap="magma",
                       extent=(0, frames * hop, 0, features.shape[-1]))
    mel.set_xlabel("time (s)")
    mel.set_ylabel("mel bin")
    fig.colorbar(shown, ax=mel, label="log mel", pad=0.01)
    fig.tight_layout()
    return fig


def plot_quality(reports: Mapping[str, Dict[str, float]]) -> Any:
    """Converter quality reports side by side: mean KL and top-1 agreement per conversion, and disk size against
    mean KL (the unquantized input's size marked). ``reports`` maps a label (e.g. "4-bit default") to the
    ``quality`` dict of a ``ConvertResult``."""
    plt = _pyplot()
    labels = list(reports)
    kl = [reports[k]["mean_kl"] for k in labels]
    top1 = [reports[k]["top1_agreement_pct"] for k in labels]
    sizes = [reports[k]["disk_bytes"] / 2**20 for k in labels]
    reference = max(reports[k]["reference_disk_bytes"] for k in labels) / 2**20
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette = [colors[i % len(colors)] for i in range(len(labels))]
    fig, (ax_kl, ax_top1, ax_size) = plt.subplots(1, 3, figsize=(14, 4))
    ax_kl.bar(labels, kl, color=palette)
    ax_kl.set_ylabel("mean KL to the input (nats, lower is better)")
    ax_top1.bar(labels, top1, color=palette)
    ax_top1.set_ylim(0, 100)
    ax_top1.set_ylabel("top-1 agreement with the input (%)")
    for ax in (ax_kl, ax_top1):
        ax.tick_params(axis="x", labelrotation=30)
    ax_size.scatter(sizes, kl, c=palette, s=60)
    for label, x, y in zip(labels, sizes, kl):
        ax_size.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_size.scatter([reference], [0.0], marker="*", s=150, color="black")
    ax_size.annotate("input", (reference, 0.0), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_size.set_xlabel("size on disk (MiB)")
    ax_size.set_ylabel("mean KL (nats)")
    ax_size.set_title("size vs quality")
    fig.tight_layout()
    return fig


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
