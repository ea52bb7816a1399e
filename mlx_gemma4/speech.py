"""Speech recognition and speech translation with Gemma 4 E2B/E4B: from an audio file (or samples) to text.

``python -m mlx_gemma4.speech --model MODEL --audio talk.wav [--translate-to French] [--audio-chunking]``

Clips over the model's 30-second limit are refused unless ``chunking`` is on; then they are cut at the quietest
moments into pieces of at most 30 s, each piece is transcribed on its own, and the texts are joined with spaces.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .audio_features import AudioError, AudioInput, check_waveform, prepare_audio, split_at_silence

# The model card's speech prompts; the audio comes first, as in Google's examples.
TRANSCRIBE = "Transcribe the following speech in {source} into {source} text."
TRANSLATE = "Translate the following speech in {source} into {target} text."


def speech_to_text(
    model,
    processor,
    audio: AudioInput,
    *,
    source_language: str = "English",
    target_language: Optional[str] = None,
    chunking: bool = False,
    max_tokens: int = 512,
    instruction: Optional[str] = None,
) -> str:
    """Transcribe ``audio`` (a file path, ``(samples, rate)`` or samples at the model's rate), or translate it into
    ``target_language`` when given. Greedy decoding. ``instruction`` overrides the prompt text (``{source}`` and
    ``{target}`` are filled in). Raises ``AudioError`` for unusable audio, including clips over 30 s without
    ``chunking``."""
    from .generate import generate  # the generator is only needed here, not by the audio front end

    extractor = processor.audio_feature_extractor
    if extractor is None:
        raise AudioError("this checkpoint has no audio encoder (only Gemma 4 E2B and E4B take audio)")
    samples = prepare_audio(audio, extractor.sampling_rate)
    pieces = split_at_silence(samples, extractor.sampling_rate, extractor.max_samples) if chunking else [samples]
    for piece in pieces:
        check_waveform(piece, extractor.sampling_rate, extractor.max_samples)
    template = instruction or (TRANSLATE if target_language else TRANSCRIBE)
    text = template.format(source=source_language, target=target_language or source_language)
    texts: List[str] = []
    for piece in pieces:
        messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}]
        answer = generate(model, processor, messages, audio=[piece], max_tokens=max_tokens)
        texts.append(answer.strip())
    return " ".join(t for t in texts if t)


def transcribe(model, processor, audio: AudioInput, *, language: str = "English", **kwargs) -> str:
    """The words spoken in ``audio``, in ``language``. Keyword arguments as for ``speech_to_text``."""
    return speech_to_text(model, processor, audio, source_language=language, **kwargs)


def translate(model, processor, audio: AudioInput, *, target_language: str, source_language: str = "English",
              **kwargs) -> str:
    """``audio`` spoken in ``source_language``, translated into ``target_language`` text."""
    return speech_to_text(model, processor, audio, source_language=source_language,
                          target_language=target_language, **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: print the transcription (or translation) of one audio file."""
    from .loader import CheckpointError, load

    p = argparse.ArgumentParser(prog="python -m mlx_gemma4.speech", description="Transcribe or translate speech.")
    p.add_argument("--model", required=True, help="an E2B/E4B checkpoint folder or Hub repo id")
    p.add_argument("--audio", required=True, help="the audio file (wav, flac, ogg, mp3 where supported)")
    p.add_argument("--language", default="English", help="the spoken language")
    p.add_argument("--translate-to", default=None, help="translate into this language instead of transcribing")
    p.add_argument("--audio-chunking", action="store_true",
                   help="split clips longer than 30 s at silences and transcribe the pieces in turn")
    p.add_argument("--max-tokens", type=int, default=512)
    args = p.parse_args(argv)
    try:
        model, processor = load(args.model)
        print(speech_to_text(model, processor, args.audio, source_language=args.language,
                             target_language=args.translate_to, chunking=args.audio_chunking,
                             max_tokens=args.max_tokens))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
