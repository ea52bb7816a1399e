"""The numpy audio front end against transformers' Gemma4AudioFeatureExtractor, plus resampling and file loading."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from mlx_gemma4.audio_features import (
    AudioError,
    AudioFeatureExtractor,
    FeatureExtractorConfig,
    load_audio,
    prepare_audio,
    resample,
    split_at_silence,
)

RATE = 16_000


def signals(n: int, rate: int = RATE, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic test clips of ``n`` samples: a tone, a linear chirp, white noise and digital silence."""
    t = np.arange(n) / rate
    duration = max(n / rate, 1e-3)
    rng = np.random.default_rng(seed)
    return {
        "tone": 0.5 * np.sin(2 * np.pi * 440 * t),
        "chirp": 0.3 * np.sin(2 * np.pi * (60 * t + (min(rate / 2, 7800) - 60) * t**2 / (2 * duration))),
        "noise": 0.1 * rng.standard_normal(n),
        "silence": np.zeros(n),
    }


@pytest.fixture(scope="module")
def hf_extractor():
    feature_extraction = pytest.importorskip("transformers.models.gemma4.feature_extraction_gemma4")
    return feature_extraction.Gemma4AudioFeatureExtractor()


def assert_same_features(hf_extractor, clips: list[np.ndarray]) -> None:
    ref = hf_extractor(clips, return_tensors="np")
    features, mask = AudioFeatureExtractor()(clips)
    assert features.shape == ref["input_features"].shape
    assert features.dtype == np.float32
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    assert np.abs(features - ref["input_features"]).max() <= 1e-4


@pytest.mark.parametrize("n", [161, 300, 12_345, 16_000, 16_007, 480_000])
@pytest.mark.parametrize("kind", ["tone", "chirp", "noise", "silence"])
def test_features_match_transformers_at_16khz(hf_extractor, n, kind):
    assert_same_features(hf_extractor, [signals(n)[kind].astype(np.float32)])


def test_padded_batch_matches_transformers(hf_extractor):
    clips = [signals(20_000)["tone"], signals(7_001)["noise"], signals(16_007)["chirp"]]
    assert_same_features(hf_extractor, [c.astype(np.float32) for c in clips])


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
@pytest.mark.parametrize("kind", ["tone", "chirp", "noise"])
def test_features_after_resampling_match_transformers(hf_extractor, rate, kind):
    clip = prepare_audio((signals(int(1.3 * rate), rate)[kind], rate), RATE)
    assert len(clip) == -(-int(1.3 * rate) * RATE // rate)
    assert_same_features(hf_extractor, [clip])


@pytest.mark.parametrize("n", [16_000 + d for d in range(-170, 171, 7)] + [16_007, 15_999, 16_161, 479_999, 480_000])
def test_token_count_matches_transformers_processor(n):
    """Gemma4Processor counts soft tokens from the feature mask after two stride-2 subsamplings."""
    extractor = AudioFeatureExtractor()
    _, mask = extractor([np.zeros(n, dtype=np.float32)])
    t = mask[0]
    for _ in range(2):  # what Gemma4Processor.replace_audio_token does
        t = t[::2][: (len(t) + 2 - 3) // 2 + 1]
    assert extractor.num_audio_tokens(n) == int(t.sum())


def test_token_count_is_not_duration_based():
    # ceil(16007 / 16000 s / 40 ms) = 26 would be one token too many.
    assert AudioFeatureExtractor().num_audio_tokens(16_007) == 25
    assert AudioFeatureExtractor().num_audio_tokens(480_000) == 750


def test_config_from_processor_config_ignores_unknown_and_null_fields():
    config = FeatureExtractorConfig.from_dict(
        {"feature_size": 128, "frame_length": 320, "per_bin_mean": None, "mel_floor": 0.001, "unknown": 1}
    )
    assert config == FeatureExtractorConfig()


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 44_100, 48_000, 96_000, 16_001])
def test_resampler_matches_scipy_resample_poly(rate):
    signal = pytest.importorskip("scipy.signal")
    x = np.random.default_rng(1).standard_normal(rate // 2 + 7)
    ref = signal.resample_poly(x, RATE, rate)
    got = resample(x, rate, RATE)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-6


def test_resampled_tone_is_the_tone():
    rate = 44_100
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate)
    got = resample(tone, rate, RATE)
    want = np.sin(2 * np.pi * 1000 * np.arange(len(got)) / RATE)
    assert np.abs(got - want)[200:-200].max() < 2e-3  # Kaiser(5) passband ripple; away from the padded edges


def test_resampler_removes_content_above_the_new_nyquist():
    rate = 48_000
    alias = np.sin(2 * np.pi * 12_000 * np.arange(rate) / rate)  # would fold to 4 kHz at 16 kHz
    assert np.abs(resample(alias, rate, RATE))[200:-200].max() < 1e-3


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_load_wav_subtypes(tmp_path, subtype):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4_800) / 48_000)
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, stereo, 48_000, subtype=subtype)
    samples, rate = load_audio(path)
    assert rate == 48_000 and samples.ndim == 1 and samples.dtype == np.float32
    assert np.abs(samples - tone).max() < (1e-2 if subtype == "PCM_U8" else 1e-4)
    at_16k = prepare_audio(path, RATE)
    assert len(at_16k) == 1_600


def test_load_flac(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, signals(8_000)["tone"], RATE)
    assert len(prepare_audio(str(path), RATE)) == 8_000


@pytest.mark.parametrize("fmt, subtype", [("MP3", None), ("OGG", "VORBIS")])
def test_load_compressed_formats(tmp_path, fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, signals(16_000)["tone"], RATE, format=fmt, subtype=subtype)
    samples, rate = load_audio(path)
    assert rate == RATE and abs(len(samples) - 16_000) < 2_000 and np.abs(samples).max() > 0.1


def test_stereo_is_averaged_and_integer_arrays_are_scaled():
    left, right = np.full(100, 0.5), np.full(100, -0.25)
    assert np.allclose(prepare_audio((np.stack([left, right], 1), RATE), RATE), 0.125)
    assert np.allclose(prepare_audio(np.full(50, 16_384, dtype=np.int16), RATE), 0.5)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"RIFF\x00\x00garbage" * 10, "cannot decode"), (b"\x00" * 64, "cannot decode")],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        load_audio(path)


def test_unsupported_format_names_the_format(tmp_path):
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 100)
    with pytest.raises(AudioError, match="'m4a' format is not supported"):
        load_audio(path)


def test_missing_and_zero_length_audio(tmp_path):
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1)), RATE)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(path)
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(np.zeros(0, dtype=np.float32), RATE)


def test_clip_over_30_seconds_is_rejected_with_the_limit_named():
    with pytest.raises(AudioError, match=r"31\.00 s long.*at most 30 s"):
        AudioFeatureExtractor()([np.zeros(31 * RATE, dtype=np.float32)])


def test_split_at_silence_cuts_in_the_gaps():
    rng = np.random.default_rng(0)
    speech = lambda seconds: 0.3 * rng.standard_normal(int(seconds * RATE))  # noqa: E731
    gap = np.zeros(RATE // 2)
    clip = np.concatenate([speech(20), gap, speech(15), gap, speech(12)]).astype(np.float32)
    pieces = split_at_silence(clip, RATE, 30 * RATE)
    assert sum(map(len, pieces)) == len(clip)
    assert all(len(p) <= 30 * RATE for p in pieces)
    assert len(pieces) == 2
    cut = len(pieces[0])
    assert 20 * RATE <= cut <= 20 * RATE + len(gap)  # inside the first gap
