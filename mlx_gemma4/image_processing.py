"""Images and videos to the patches the Gemma 4 vision encoder reads (numpy + Pillow).

An image is resized, keeping its aspect ratio, to the largest size whose sides
are multiples of `pooling_kernel_size * patch_size` and whose patch count fits
`max_soft_tokens * pooling_kernel_size**2`; it is then cut into
`patch_size`×`patch_size` patches (flattened row by row, channel fastest),
padded to that fixed patch count, and every patch gets its (column, row)
position, (-1, -1) for padding. Each k×k block of patches becomes one soft
token. A video is a sequence of such frames, usually at a smaller budget.
"""

from __future__ import annotations

import io
import math
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The soft-token budgets the encoder was trained with.
SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)
# Above this many pixels a file is first decoded at a reduced scale (JPEG draft mode,
# then integer box reduction) so a huge image never sits in memory at full size.
_LARGE_IMAGE_PIXELS = 8192 * 8192
# Images with more pixels than this are refused.
MAX_IMAGE_PIXELS = 32768 * 32768


class ImageInputError(ValueError):
    """An image or video that cannot be used; the message says which and why."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        text = str(source)
        return text if len(text) < 120 else text[:117] + "..."
    return type(source).__name__


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        channels = source.shape[-1] if source.ndim == 3 else 1
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or channels not in (1, 3, 4):
            raise ImageInputError(
                f"image array must be uint8 [height, width] or [height, width, 1|3|4], "
                f"got {source.dtype} {source.shape}"
            )
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source)
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            with urllib.request.urlopen(text, timeout=30) as response:
                return Image.open(io.BytesIO(response.read()))
        if not Path(text).expanduser().is_file():
            raise ImageInputError(f"image {_describe(source)}: no such file")
        return Image.open(Path(text).expanduser())
    raise ImageInputError(
        f"unsupported image input of type {type(source).__name__}; pass a path, URL, bytes, PIL image or uint8 array"
    )


def load_image(source: Any, min_side: int = 1) -> Image.Image:
    """A decoded PIL image, EXIF orientation applied, from a path, URL, bytes,
    PIL image or uint8 numpy array. Files above ~67 megapixels (up to
    `MAX_IMAGE_PIXELS`) are decoded at a reduced scale whose sides stay at least
    `min_side`, so a huge image never sits in memory at full size."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own decompression-bomb limit is lifted to ours while opening.
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(source)
            if image.width * image.height > _LARGE_IMAGE_PIXELS and getattr(image, "fp", None) is not None:
                image = _decode_reduced(image, min_side)
            image.load()
        image = ImageOps.exif_transpose(image)
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageInputError(f"image {_describe(source)}: larger than {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageInputError(f"image {_describe(source)}: cannot read it ({reason})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if image.width < 1 or image.height < 1:
        raise ImageInputError(f"image {_describe(source)}: empty ({image.width}x{image.height})")
    return image


def _decode_reduced(image: Image.Image, min_side: int) -> Image.Image:
    """Decode at the largest integer reduction that keeps ~67 megapixels and both sides >= min_side."""
    width, height = image.size
    factor = int(math.sqrt(width * height / _LARGE_IMAGE_PIXELS))
    factor = max(1, min(factor, min(width, height) // max(min_side, 1)))
    if image.format == "JPEG":
        image.draft(image.mode, (width // factor, height // factor))  # decodes at 1/2, 1/4 or 1/8 scale
    image.load()
    remaining = factor // max(1, width // image.width)
    return image.reduce(remaining) if remaining > 1 else image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white; 16-bit grey keeps its top 8 bits."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        # Pillow's own conversion clips 16-bit values at 255, which turns most images white.
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int):
    """(height, width) after the aspect-preserving resize into `max_soft_tokens`."""
    max_patches = max_soft_tokens * pooling_kernel_size**2
    side = pooling_kernel_size * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    new_height = int(math.floor(factor * height / side)) * side
    new_width = int(math.floor(factor * width / side)) * side
    longest = max_soft_tokens * side
    # A very thin image: its short side gets one block, its long side as many as fit.
    if new_height == 0:
        new_height, new_width = side, min(int(math.floor(width / height)) * side, longest)
    elif new_width == 0:
        new_height, new_width = min(int(math.floor(height / width)) * side, longest), side
    return new_height, new_width


@dataclass
class ProcessedImages:
    """Encoder inputs for a list of images (or video frames)."""

    pixel_values: np.ndarray  # float32 [n, max_patches, 3 * patch_size**2]
    position_ids: np.ndarray  # int32 [n, max_patches, 2], (column, row); (-1, -1) = padding
    num_soft_tokens: list = field(default_factory=list)  # per image


class ImageProcessor:
    """Gemma 4's image processor: `processor(images, max_soft_tokens=280)`."""

    def __init__(
        self,
        patch_size: int,
        pooling_kernel_size: int,
        max_soft_tokens: int = 280,
        do_resize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: Sequence[float] = (0.0, 0.0, 0.0),
        image_std: Sequence[float] = (1.0, 1.0, 1.0),
        do_convert_rgb: bool = True,
    ) -> None:
        self.patch_size = patch_size
        self.pooling_kernel_size = pooling_kernel_size
        self.max_soft_tokens = check_budget(max_soft_tokens)
        self.do_resize = do_resize
        self.resample = Image.Resampling(resample)
        self.do_rescale, self.rescale_factor = do_rescale, rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_dict(cls, params: dict) -> "ImageProcessor":
        """From the `image_processor` entry of processor_config.json (unknown keys ignored)."""
        names = ("patch_size", "pooling_kernel_size", "max_soft_tokens", "do_resize", "resample", "do_rescale",
                 "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
        missing = [n for n in ("patch_size", "pooling_kernel_size") if params.get(n) is None]
        if missing:
            raise ValueError(f"image processor config: missing {', '.join(missing)}")
        return cls(**{k: params[k] for k in names if params.get(k) is not None})

    def __call__(self, images: Sequence[Any], *, max_soft_tokens: Optional[int] = None) -> ProcessedImages:
        """Process `images` (paths, URLs, bytes, PIL images or uint8 arrays) at
        `max_soft_tokens` (one of 70, 140, 280, 560, 1120; default from the config)."""
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        max_patches = budget * self.pooling_kernel_size**2
        side = self.pooling_kernel_size * self.patch_size
        pixels, positions, counts = [], [], []
        for source in images:
            patches, grid = self._patches(load_image(source, min_side=side), budget)
            counts.append(len(patches) // self.pooling_kernel_size**2)
            padded = np.zeros((max_patches, patches.shape[1]), np.float32)
            padded[: len(patches)] = patches
            where = np.full((max_patches, 2), -1, np.int32)
            where[: len(grid)] = grid
            pixels.append(padded)
            positions.append(where)
        width = 3 * self.patch_size**2
        return ProcessedImages(
            np.stack(pixels) if pixels else np.zeros((0, max_patches, width), np.float32),
            np.stack(positions) if positions else np.zeros((0, max_patches, 2), np.int32),
            counts,
        )

    def _patches(self, image: Image.Image, budget: int):
        """`(patches [n, p*p*3], positions [n, 2])` of one image at `budget`."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        if self.do_resize:
            height, width = target_size(image.height, image.width, self.patch_size, self.pooling_kernel_size, budget)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), resample=self.resample, reducing_gap=None)
        array = np.asarray(image)
        if self.do_rescale:
            # float64 first, then float32: the rounding transformers' processors produce.
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            array = array.astype(np.float32)
        if self.do_normalize:
            array = (array - self.image_mean) / self.image_std
        p = self.patch_size
        rows, cols = array.shape[0] // p, array.shape[1] // p
        patches = array[: rows * p, : cols * p].reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int32)
        return patches.reshape(rows * cols, p * p * 3), positions


def check_budget(max_soft_tokens: Any) -> int:
    """`max_soft_tokens` if it is a supported budget, else a clear error."""
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_BUDGETS:
        raise ImageInputError(
            f"image token budget {max_soft_tokens!r} is not supported; use one of "
            f"{', '.join(map(str, SUPPORTED_BUDGETS))}"
        )
    return int(max_soft_tokens)


@dataclass
class ProcessedVideos:
    """Encoder inputs for a list of videos; the frames of all videos are stacked."""

    pixel_values: np.ndarray  # float32 [total_frames, max_patches, 3 * patch_size**2]
    position_ids: np.ndarray  # int32 [total_frames, max_patches, 2]
    num_frames: list  # per video
    num_soft_tokens: list  # per frame, per video
    timestamps: list  # per video: seconds of each sampled frame


class VideoProcessor:
    """Gemma 4's video processor: frames sampled at `fps` (at most `max_frames`,
    spread evenly over the whole video beyond that), each processed like an
    image at the video budget."""

    def __init__(self, frames: ImageProcessor, fps: float = 1.0, max_frames: int = 60, frames_fps: float = 24.0):
        """`frames` processes each frame (its `max_soft_tokens` is the default
        video budget); `frames_fps` is the frame rate assumed for a plain list
        of frames, which has none of its own."""
        self.frames = frames
        self.fps, self.max_frames, self.frames_fps = fps, max_frames, frames_fps

    @classmethod
    def from_dict(cls, params: dict) -> "VideoProcessor":
        """From the `video_processor` entry of processor_config.json."""
        extra = {k: params[k] for k in ("fps", "max_frames") if params.get(k) is not None}
        return cls(ImageProcessor.from_dict(params), **extra)

    def __call__(
        self,
        videos: Sequence[Any],
        *,
        max_soft_tokens: Optional[int] = None,
        fps: Optional[float] = None,
        max_frames: Optional[int] = None,
    ) -> ProcessedVideos:
        """Process `videos`: each a video file path (needs the `video` extra,
        PyAV), a list of frames (anything `ImageProcessor` takes), or a dict
        `{"frames": [...], "fps": float}`. Budget 70 or 140 is typical."""
        fps = self.fps if fps is None else fps
        max_frames = self.max_frames if max_frames is None else max_frames
        if fps <= 0 or max_frames < 1:
            raise ImageInputError(
                f"video sampling needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}"
            )
        pixels, positions, counts, tokens, stamps = [], [], [], [], []
        for video in videos:
            frames, times = self._sample(video, fps, max_frames)
            processed = self.frames(frames, max_soft_tokens=max_soft_tokens)
            pixels.append(processed.pixel_values)
            positions.append(processed.position_ids)
            counts.append(len(frames))
            tokens.append(processed.num_soft_tokens[0])
            stamps.append(times)
        return ProcessedVideos(np.concatenate(pixels), np.concatenate(positions), counts, tokens, stamps)

    def _sample(self, video: Any, fps: float, max_frames: int):
        """(frames, timestamps in seconds) of one video."""
        if isinstance(video, dict):
            frames, rate = list(video.get("frames") or []), float(video.get("fps") or self.frames_fps)
        elif isinstance(video, (list, tuple)):
            frames, rate = list(video), self.frames_fps
        elif isinstance(video, (str, Path)):
            return _decode_video(str(video), fps, max_frames)
        else:
            raise ImageInputError(
                f"unsupported video input of type {type(video).__name__}; pass a file path or a list of frames"
            )
        if not frames:
            raise ImageInputError("video has no frames")
        # A list of frames is taken as already sampled, unless it exceeds the frame limit.
        if len(frames) > max_frames:
            _warn_frame_limit(f"video of {len(frames)} frames", max_frames)
        indices = _even_indices(len(frames), min(len(frames), max_frames))
        return [frames[i] for i in indices], [i / rate for i in indices]


def _even_indices(total: int, count: int) -> list:
    """`count` frame indices spread evenly over `total` frames, starting at 0."""
    return [i * total // count for i in range(count)]


def _warn_frame_limit(what: str, max_frames: int) -> None:
    warnings.warn(f"{what} exceeds the limit of {max_frames} frames: sampling {max_frames} frames evenly over it",
                  stacklevel=4)


def _decode_video(path: str, fps: float, max_frames: int):
    """Frames of the video file at `path` sampled at `fps`, at most `max_frames`."""
    try:
        import av
    except ImportError:
        raise ImageInputError(
            "reading video files needs PyAV: pip install 'mlx-gemma4[video]' (or pass a list of frames)"
        ) from None
    if not Path(path).is_file():
        raise ImageInputError(f"video {path}: no such file")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 24)
            total = stream.frames
            if not total and stream.duration:
                total = int(float(stream.duration * stream.time_base) * rate)
            decoded = None
            if not total:  # the container does not say: decode everything once
                decoded = [frame.to_image() for frame in container.decode(stream)]
                total = len(decoded)
            wanted = min(total, max(1, int(total / rate * fps)))
            if wanted > max_frames:
                _warn_frame_limit(f"video {path} ({total / rate:.1f} s at {fps:g} fps)", max_frames)
            indices = _even_indices(total, min(wanted, max_frames))
            if decoded is None:
                keep, decoded = set(indices), {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in keep:
                        decoded[i] = frame.to_image()
                    if i >= indices[-1]:
                        break
                indices = [i for i in indices if i in decoded]
            frames = [decoded[i] for i in indices]
    except (av.FFmpegError, OSError, IndexError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageInputError(f"video {path}: cannot read it ({reason})") from None
    if not frames:
        raise ImageInputError(f"video {path}: no decodable frames")
    return frames, [i / rate for i in indices]
