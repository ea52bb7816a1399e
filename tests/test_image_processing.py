"""mlx_gemma4.image_processing against transformers' Gemma 4 image processor (its Pillow backend: the torchvision
one, and the video processor, cannot be built without torchvision), plus the bad inputs it must refuse clearly."""

import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.image_processing import (
    SUPPORTED_BUDGETS,
    ImageInputError,
    ImageProcessor,
    VideoProcessor,
    load_image,
    target_size,
)

transformers = pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

# The released E2B/E4B settings (patch 16, 3x3 pooling) and the tiny test towers' (patch 4, 2x2 pooling).
REAL = {"patch_size": 16, "pooling_kernel_size": 3}
TINY = {"patch_size": 4, "pooling_kernel_size": 2}
SIZES = [(50, 70), (70, 50), (333, 500), (1000, 1000), (7, 900), (900, 7), (1, 1), (2000, 31)]


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def ours_and_theirs(images, budget, sizes=REAL, hf_images=None):
    ours = ImageProcessor(**sizes)(images, max_soft_tokens=budget)
    theirs = Gemma4ImageProcessorPil(**sizes, max_soft_tokens=budget)(hf_images or images, return_tensors="np")
    return ours, theirs


def assert_same(ours, theirs):
    assert ours.num_soft_tokens == list(theirs["num_soft_tokens_per_image"])
    np.testing.assert_array_equal(ours.position_ids, theirs["image_position_ids"])
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("budget", SUPPORTED_BUDGETS)
@pytest.mark.parametrize("sizes", [REAL, TINY], ids=["real", "tiny"])
def test_every_budget_and_aspect_ratio_matches_transformers(budget, sizes):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours, theirs = ours_and_theirs(images, budget, sizes)
    assert_same(ours, theirs)
    assert all(0 < n <= budget for n in ours.num_soft_tokens)


def test_token_count_example_from_the_reference():
    assert target_size(1000, 1000, 16, 3, 280) == (768, 768)
    assert ImageProcessor(**REAL)([random_image(1000, 1000)]).num_soft_tokens == [256]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "P-transparent", "1"])
def test_image_modes_convert_like_transformers(mode):
    base = random_image(45, 61, "RGBA" if mode in ("RGBA", "P-transparent") else "RGB", seed=3)
    if mode == "LA":
        image = random_image(45, 61, "LA", seed=3)
    elif mode in ("L", "CMYK", "1"):
        image = base.convert(mode)
    elif mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "P-transparent":
        image = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
    else:
        image = base
    assert_same(*ours_and_theirs([image], 70))


def test_sixteen_bit_grey_keeps_its_top_byte():
    """Pillow clips 16-bit grey at 255 when converting to RGB (transformers gets a white image); we scale."""
    values = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    eight_bit = Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    assert_same(*ours_and_theirs([image], 70, hf_images=[eight_bit]))
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert_same(*ours_and_theirs([png.getvalue()], 70, hf_images=[eight_bit]))


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    random_image(40, 90, seed=4).save(path, exif=exif, quality=95)
    loaded = load_image(str(path))
    assert loaded.size == (40, 90)
    assert_same(*ours_and_theirs([str(path)], 140, hf_images=[hf_load_image(str(path))]))


def test_sources_paths_bytes_arrays(tmp_path):
    image = random_image(30, 40, seed=5)
    path = tmp_path / "image.png"
    image.save(path)
    expected = ImageProcessor(**TINY)([image])
    for source in (str(path), path, path.read_bytes(), np.asarray(image)):
        got = ImageProcessor(**TINY)([source])
        np.testing.assert_array_equal(got.pixel_values, expected.pixel_values)


@pytest.mark.parametrize("budget", [0, 100, 281, 2240, True, "280", None])
def test_unsupported_budget_is_a_clear_error(budget):
    processor = ImageProcessor(**TINY)
    if budget is None:  # None means the config's default
        assert processor([random_image(8, 8)], max_soft_tokens=None).num_soft_tokens
        return
    with pytest.raises(ImageInputError, match="token budget .* is not supported; use one of 70, 140, 280, 560, 1120"):
        processor([random_image(8, 8)], max_soft_tokens=budget)


def test_bad_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.png"
    random_image(64, 64, seed=6).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (str(truncated), "cannot read it"),
        (str(text), "cannot read it"),
        (str(tmp_path / "missing.png"), "no such file"),
        (b"\x00\x01garbage", "cannot read it"),
        (Image.new("RGB", (0, 0)), "empty"),
        (np.zeros((4, 4), np.float64), "uint8"),
        (42, "unsupported image input of type int"),
    ]
    for source, reason in cases:
        with pytest.raises(ImageInputError, match=reason) as error:
            ImageProcessor(**TINY)([source])
        assert "\n" not in str(error.value)


def test_one_pixel_image_is_upscaled():
    out = ImageProcessor(**TINY)([random_image(1, 1)], max_soft_tokens=70)
    assert out.num_soft_tokens == [64]


# Peak memory from VmHWM: unlike ru_maxrss, it is not inherited from the (large) pytest process across exec.
HUGE = """
import sys, time
from mlx_gemma4.image_processing import ImageProcessor
start = time.time()
out = ImageProcessor(patch_size=16, pooling_kernel_size=3)([sys.argv[1]], max_soft_tokens=280)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(out.num_soft_tokens[0], int(status["VmHWM"].split()[0]) // 1024, round(time.time() - start, 1))
"""


def test_huge_image_is_decoded_reduced(tmp_path):
    """A 20000x20000 JPEG (1.2 GB as RGB) is decoded at reduced scale: peak memory stays well below its full size."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc")
    path = tmp_path / "huge.jpg"
    Image.new("L", (20000, 20000), 128).save(path, quality=50)
    result = subprocess.run([sys.executable, "-c", HUGE, str(path)], capture_output=True, text=True, check=True)
    tokens, peak_mb, seconds = map(float, result.stdout.split())
    print(f"20000x20000 JPEG: {tokens:.0f} soft tokens, peak RSS {peak_mb:.0f} MB, {seconds} s")
    assert tokens == 256
    assert peak_mb < 900


def frames(n, height=36, width=52):
    return [random_image(height, width, seed=10 + i) for i in range(n)]


def test_video_from_frames_matches_per_frame_image_processing():
    video = frames(4)
    out = VideoProcessor(ImageProcessor(**TINY, max_soft_tokens=70))([video])
    theirs = Gemma4ImageProcessorPil(**TINY, max_soft_tokens=70)(video, return_tensors="np")
    np.testing.assert_allclose(out.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out.position_ids, theirs["image_position_ids"])
    assert out.num_frames == [4] and out.num_soft_tokens == [theirs["num_soft_tokens_per_image"][0]]
    assert out.timestamps == [[0.0, 1 / 24, 2 / 24, 3 / 24]]  # transformers' default for unknown fps


def test_video_longer_than_the_limit_is_sampled_with_a_warning():
    processor = VideoProcessor(ImageProcessor(**TINY, max_soft_tokens=70), max_frames=3)
    with pytest.warns(UserWarning, match="exceeds the limit of 3 frames"):
        out = processor([{"frames": frames(7), "fps": 1.0}])
    assert out.num_frames == [3] and out.timestamps == [[0.0, 2.0, 4.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert processor([frames(3)]).num_frames == [3]


def test_video_file_without_pyav_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"pip install 'mlx-gemma4\[video\]'"):
        VideoProcessor(ImageProcessor(**TINY))([str(path)])


def write_video(path, seconds: int, fps: int, height=48, width=64):
    """A synthetic clip whose frames differ (a moving bar), and the decoded frames as PIL images."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            pixels = np.full((height, width, 3), 40, np.uint8)
            pixels[:, (i * 3) % width: (i * 3) % width + 8] = (200, 120, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def test_video_file_is_sampled_at_one_fps(tmp_path):
    decoded = write_video(tmp_path / "clip.mp4", seconds=3, fps=10)
    processor = VideoProcessor(ImageProcessor(**TINY, max_soft_tokens=70))
    out = processor([str(tmp_path / "clip.mp4")])
    assert out.num_frames == [3] and out.timestamps == [[0.0, 1.0, 2.0]]
    sampled = [decoded[0], decoded[10], decoded[20]]
    theirs = Gemma4ImageProcessorPil(**TINY, max_soft_tokens=70)(sampled, return_tensors="np")
    np.testing.assert_allclose(out.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="exceeds the limit of 2 frames"):
        assert processor([str(tmp_path / "clip.mp4")], max_frames=2).timestamps == [[0.0, 1.5]]
