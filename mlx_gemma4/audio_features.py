"""Audio input for Gemma 4 E2B/E4B, in numpy: loading, resampling, log-mel features, token counts.

The feature extractor reproduces transformers' ``Gemma4AudioFeatureExtractor`` (semicausal framing, periodic Hann
window, magnitude spectrum, HTK mel filters without normalisation, ``log(mel + floor)``, frame validity mask), and
``num_audio_tokens`` counts soft tokens exactly as ``Gemma4Processor`` does: from the frame mask after the encoder's
two stride-2 subsampling convolutions, not from the clip duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

# Seconds of audio treated as one analysis frame when looking for a quiet place to cut a long clip.
_SILENCE_FRAME_S = 0.02
# A chunk boundary is searched for in the last part of each chunk: never cut a chunk shorter than this fraction.
_MIN_CHUNK_FRACTION = 0.5

AudioInput = Union[str, Path, np.ndarray, Tuple[np.ndarray, int]]


class AudioError(ValueError):
    """Audio that cannot be used; the message says why and what to do."""


@dataclass
class FeatureExtractorConfig:
    """Settings of the log-mel front end (a checkpoint's ``processor_config.json`` ``feature_extractor``)."""

    feature_size: int = 128
    sampling_rate: int = 16_000
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: Optional[List[float]] = None
    per_bin_stddev: Optional[List[float]] = None
    padding_value: float = 0.0
    # transformers' defaults for the call: clips are right-padded to a multiple of 128 samples, at most 30 s.
    max_length: int = 480_000
    pad_to_multiple_of: int = 128

    @classmethod
    def from_dict(cls, params: dict) -> "FeatureExtractorConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names and v is not None})


def _hz_to_mel(freq: Any) -> Any:
    return 2595.0 * np.log10(1.0 + freq / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (np.power(10, mel / 2595.0) - 1.0)


def mel_filters(num_bins: int, num_mels: int, min_hz: float, max_hz: float, sampling_rate: int) -> np.ndarray:
    """Triangular HTK-mel filters without area normalisation, ``[num_bins, num_mels]`` float64."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(min_hz), _hz_to_mel(max_hz), num_mels + 2))
    # transformers spaces the FFT bins up to sampling_rate // 2 (integer Nyquist).
    bins = np.linspace(0, sampling_rate // 2, num_bins)
    widths = np.diff(edges)
    offsets = edges[None, :] - bins[:, None]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


class AudioFeatureExtractor:
    """Mono waveforms at ``sampling_rate`` → log-mel ``input_features [B, T, mels]`` and ``input_features_mask``."""

    def __init__(self, config: Optional[FeatureExtractorConfig] = None) -> None:
        self.config = c = config or FeatureExtractorConfig()
        self.sampling_rate = c.sampling_rate
        self.frame_length = int(round(c.sampling_rate * c.frame_length_ms / 1000.0))
        self.hop_length = int(round(c.sampling_rate * c.hop_length_ms / 1000.0))
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if c.fft_overdrive else 1)
        periodic_hann = np.hanning(self.frame_length + 1)[:-1]
        self.window = periodic_hann.astype(np.float32)
        self.mel_filters = mel_filters(
            self.fft_length // 2 + 1, c.feature_size, c.min_frequency, c.max_frequency, c.sampling_rate
        )
        self._rng = np.random.default_rng(0)

    @property
    def max_samples(self) -> int:
        """Longest clip the model takes, in samples (30 s for Gemma 4)."""
        return self.config.max_length

    def num_frames(self, num_samples: int) -> int:
        """Mel frames whose whole analysis window lies inside a clip of ``num_samples`` (the valid frames)."""
        # Frame i spans padded samples [i*hop, i*hop + frame_length]; the left pad is frame_length // 2.
        last = num_samples + self.frame_length // 2 - (self.frame_length + 1)
        return max(0, last // self.hop_length + 1)

    def num_audio_tokens(self, num_samples: int) -> int:
        """Soft tokens the encoder yields for a clip: valid frames after two stride-2 subsamplings, as
        transformers counts them (not ``ceil(duration / 40 ms)``, which is one too many for e.g. 16007 samples)."""
        frames = self.num_frames(min(num_samples, self.max_samples))
        for _ in range(2):
            frames = (frames + 1) // 2
        return frames

    def __call__(self, waveforms: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Features of a batch of mono clips (float arrays at ``sampling_rate``), right-padded to the longest.

        Returns ``(input_features [B, T, feature_size] float32, input_features_mask [B, T] bool)``; frames that
        reach into padding are zero and masked out. Raises ``AudioError`` for a clip longer than ``max_samples``.
        """
        if len(waveforms) == 0:
            raise AudioError("no audio clips given")
        clips = [np.asarray(w, dtype=np.float32) for w in waveforms]
        for clip in clips:
            check_waveform(clip, self.sampling_rate, self.max_samples)
        multiple = self.config.pad_to_multiple_of or 1
        length = -(-max(len(c) for c in clips) // multiple) * multiple
        batch = np.full((len(clips), length), self.config.padding_value, dtype=np.float32)
        valid = np.zeros((len(clips), length), dtype=bool)
        for row, clip in enumerate(clips):
            batch[row, : len(clip)] = clip
            valid[row, : len(clip)] = True
        features = np.stack([self._log_mel(row) for row in batch])
        mask = self._frame_mask(valid, features.shape[1])
        return features * mask[..., None], mask

    def _log_mel(self, waveform: np.ndarray) -> np.ndarray:
        c = self.config
        if c.dither > 0.0:
            waveform = waveform + c.dither * self._rng.standard_normal(waveform.shape).astype(waveform.dtype)
        if c.input_scale_factor != 1.0:
            waveform = waveform * c.input_scale_factor
        # Semicausal framing: half a frame of zeros in front, frames of frame_length + 1 samples every hop.
        padded = np.pad(waveform, (self.frame_length // 2, 0))
        span = self.frame_length + 1
        count = max(0, (len(padded) - span) // self.hop_length + 1)
        frames = np.lib.stride_tricks.sliding_window_view(padded, span)[:: self.hop_length][:count]
        if c.preemphasis > 0.0:
            if c.preemphasis_htk_flavor:
                first = frames[:, :1] * (1.0 - c.preemphasis)
                frames = np.concatenate([first, frames[:, 1:-1] - c.preemphasis * frames[:, :-2]], axis=-1)
            else:
                frames = frames[:, 1:] - c.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(spectrum @ self.mel_filters + np.float64(c.mel_floor))
        if c.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(c.per_bin_mean)
        if c.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(c.per_bin_stddev)
        return log_mel.astype(np.float32)

    def _frame_mask(self, valid: np.ndarray, num_frames: int) -> np.ndarray:
        # A frame counts only if the last sample of its window is real audio (in the left-padded timeline).
        ends = np.arange(num_frames) * self.hop_length + self.frame_length - self.frame_length // 2
        return valid[:, ends]


def check_waveform(waveform: np.ndarray, sampling_rate: int, max_samples: Optional[int] = None) -> None:
    """Raise ``AudioError`` unless ``waveform`` is a non-empty, finite, 1-D clip of at most ``max_samples``."""
    if waveform.ndim != 1:
        raise AudioError(f"audio must be mono (1-D samples), got shape {waveform.shape}")
    if waveform.size == 0:
        raise AudioError("audio clip is empty (no samples)")
    if not np.isfinite(waveform).all():
        raise AudioError("audio clip contains NaN or infinite samples")
    if max_samples is not None and waveform.size > max_samples:
        raise AudioError(
            f"audio clip is {waveform.size / sampling_rate:.2f} s long; Gemma 4 takes at most "
            f"{max_samples / sampling_rate:g} s per clip. Trim it, or let it be split at silences "
            "(mlx_gemma4.speech: chunking=True, or --audio-chunking on its command line)"
        )


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling of a 1-D signal (float32 out).

    The anti-aliasing filter is a Kaiser-windowed sinc (beta 5, 10 zero crossings per side at the lower of the two
    rates), the same design as ``scipy.signal.resample_poly``'s default; the output has
    ``ceil(len * target / orig)`` samples and is aligned with the input's first sample.
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    x = np.asarray(waveform, dtype=np.float64)
    g = math.gcd(int(orig_rate), int(target_rate))
    up, down = int(target_rate) // g, int(orig_rate) // g
    if up == down:
        return x.astype(np.float32)
    n_in = len(x)
    n_out = -(-n_in * up // down)
    rate = max(up, down)
    half = 10 * rate
    taps = np.arange(2 * half + 1) - half
    kernel = np.sinc(taps / rate) * np.kaiser(2 * half + 1, 5.0)
    kernel *= up / kernel.sum()
    # Polyphase table: output n uses input samples k_hi(n), k_hi(n) - 1, ... with taps phase[r(n)].
    per_phase = -(-(2 * half + 1) // up)
    kernel = np.pad(kernel, (0, per_phase * up - kernel.size))
    phases = kernel.reshape(per_phase, up).T
    # Zero padding around x so that every gathered index is in range.
    x = np.pad(x, (per_phase, per_phase + half // up + 1))
    out = np.empty(n_out, dtype=np.float64)
    steps = np.arange(per_phase)
    block = max(1, 2**22 // per_phase)
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out))
        pos = n * down + half
        k_hi, r = pos // up, pos % up
        out[n] = np.einsum("nj,nj->n", x[k_hi[:, None] - steps + per_phase], phases[r])
    return out.astype(np.float32)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of ``[frames, channels]`` samples (a 1-D array passes through)."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise AudioError(f"audio must be [samples] or [samples, channels], got shape {samples.shape}")
    # Interpret the short axis as channels so that [channels, samples] arrays are also accepted.
    if samples.shape[0] < samples.shape[1] and samples.shape[0] <= 8:
        samples = samples.T
    return samples.astype(np.float32).mean(axis=1)


def load_audio(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
    """Read an audio file with libsndfile: ``(float32 mono samples in [-1, 1], sample rate)``.

    WAV (8/16/24/32-bit integer or float), FLAC, OGG/Vorbis/Opus, and MP3 where the installed libsndfile supports
    it. Any failure is an ``AudioError`` naming the file and the reason.
    """
    import soundfile  # optional at import time: only audio input needs libsndfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError) as e:
        suffix = path.suffix.lower().lstrip(".") or "unknown"
        known = {f.lower() for f in soundfile.available_formats()}
        hint = (
            f"the '{suffix}' format is not supported by this libsndfile (supported: {', '.join(sorted(known))}); "
            "convert it, e.g. `ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav`"
            if suffix not in known
            else "the file looks corrupt or truncated"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AudioError(f"{path}: cannot decode audio ({reason}); {hint}") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file contains no audio samples")
    return to_mono(samples), int(rate)


def prepare_audio(audio: AudioInput, sampling_rate: int, input_rate: Optional[int] = None) -> np.ndarray:
    """One clip as mono float32 at ``sampling_rate``: from a file path, an ``(array, rate)`` pair, or an array
    (at ``input_rate``, default ``sampling_rate``). Integer arrays are scaled from their full range to [-1, 1]."""
    if isinstance(audio, (str, Path)):
        samples, rate = load_audio(audio)
    else:
        if isinstance(audio, tuple):
            if len(audio) != 2:
                raise AudioError("audio tuples must be (samples, sample_rate)")
            audio, input_rate = audio
        samples = np.asarray(audio)
        if samples.dtype.kind in "iu":
            info = np.iinfo(samples.dtype)
            samples = (samples.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
        elif samples.dtype.kind != "f":
            raise AudioError(f"audio arrays must hold numbers, got dtype {samples.dtype}")
        samples = to_mono(samples)
        rate = int(input_rate or sampling_rate)
    check_waveform(samples, rate)
    return samples if rate == sampling_rate else resample(samples, rate, sampling_rate)


def split_at_silence(waveform: np.ndarray, sampling_rate: int, max_samples: int) -> List[np.ndarray]:
    """Cut a long clip into pieces of at most ``max_samples``, each cut at the quietest point of the second half
    of its piece (short-time energy over 20 ms frames), so that words are rarely split."""
    frame = max(1, int(sampling_rate * _SILENCE_FRAME_S))
    pieces, start, total = [], 0, len(waveform)
    while total - start > max_samples:
        lo = start + int(max_samples * _MIN_CHUNK_FRACTION)
        hi = start + max_samples
        region = waveform[lo:hi]
        usable = len(region) // frame * frame
        energy = np.square(region[:usable].astype(np.float64)).reshape(-1, frame).sum(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2 if usable else hi
        pieces.append(waveform[start:cut])
        start = cut
    pieces.append(waveform[start:])
    return pieces
