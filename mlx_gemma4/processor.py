"""Chat templating and tokenisation for Gemma 4 checkpoints, without torch or transformers.

``Processor`` reads a checkpoint's ``tokenizer.json`` with the ``tokenizers`` library and renders its chat template
with jinja2 in the same sandboxed environment, with the same variables, as transformers'
``PreTrainedTokenizerBase.apply_chat_template`` (``transformers/utils/chat_template_utils.py``), so prompts are
byte-identical to the ones transformers would build. Images and videos go through ``image_processing``; each
image placeholder of the prompt becomes begin-of-image, one placeholder per soft token, end-of-image, as transformers'
``Gemma4Processor`` expands it. Audio clips go through ``audio_features``; each audio placeholder becomes
begin-of-audio, one placeholder per soft token (counted as transformers counts them), end-of-audio.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import mlx.core as mx
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .audio_features import AudioError, AudioFeatureExtractor, FeatureExtractorConfig, prepare_audio
from .image_processing import ImageInputError, ImageProcessor, VideoProcessor
from .tools import tool_schemas

# Names under which a message's reasoning may arrive; templates read "reasoning_content" (or "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}…{% endgeneration %}`` blocks and renders their body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _TemplateDict:
    """The template's ``dict``: builds plain dicts without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja ``namespace`` that refuses underscore-prefixed attributes (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Unlike jinja's built-in filter: no HTML escaping, non-ASCII kept as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles ``source`` in transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuilds ``value`` from plain JSON-like types; other objects (images, arrays) become ``"<TypeName>"``.

    The sandbox cannot vet arbitrary objects' methods, and templates only test media keys for presence.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template sees them: ``None`` fields dropped, reasoning also under its other names."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special-token entry of a tokenizer config: a string or a serialised AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(folder: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens transformers passes to chat templates (``tokenizer.special_tokens_map``).

    Besides bos/eos/unk/pad/..., every string-valued "*_token" entry of tokenizer_config.json is one (Gemma 4:
    ``image_token``, ``sot_token``, ``eot_token``, ...).
    """
    entries = {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        entries.update(extra)
    if "added_tokens_decoder" not in tokenizer_config:
        # Legacy layout: transformers then lets special_tokens_map.json override the config entries.
        special_map = _read_json(folder / "special_tokens_map.json")
        entries.update({k: v for k, v in special_map.items() if k.endswith("_token")})
    return {name: token for name, value in entries.items() if (token := _token_content(value)) is not None}


def _find_chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's ``chat_template``, else chat_template.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def _media_processors(folder: Path) -> tuple[ImageProcessor | None, VideoProcessor | None]:
    """The image and video processors of processor_config.json (or the older preprocessor_config.json files)."""
    config = _read_json(folder / "processor_config.json")
    image = config.get("image_processor") or _read_json(folder / "preprocessor_config.json")
    video = config.get("video_processor") or _read_json(folder / "video_preprocessor_config.json")
    try:
        return (ImageProcessor.from_dict(image) if image.get("patch_size") else None,
                VideoProcessor.from_dict(video) if video.get("patch_size") else None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder}: bad image/video processor config ({e})") from None


def _audio_feature_extractor(folder: Path) -> AudioFeatureExtractor | None:
    """The log-mel front end of a checkpoint with an audio encoder: processor_config.json's ``feature_extractor``
    (or preprocessor_config.json), transformers' defaults where absent."""
    if not _read_json(folder / "config.json").get("audio_config"):
        return None
    params = _read_json(folder / "processor_config.json").get("feature_extractor")
    params = params or _read_json(folder / "preprocessor_config.json")
    try:
        return AudioFeatureExtractor(FeatureExtractorConfig.from_dict(params))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder}: bad audio feature extractor config ({e})") from None


class Processor:
    """Turns chats, text, images and videos into model inputs for a Gemma 4 checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        eos_token_ids: Iterable[int] = (),
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        audio_feature_extractor: AudioFeatureExtractor | None = None,
    ) -> None:
        """``special_tokens`` maps names (``bos_token``, ``eot_token``, ``image_token``, ``video_token``, ...) to
        token strings; they are visible to the chat template. ``eos_token_ids`` are stop ids added to the
        tokenizer's own ``eos_token``. Without an ``image_processor`` / ``video_processor`` the processor refuses
        images / videos."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.audio_feature_extractor = audio_feature_extractor
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.pad_token_id = self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None
        eos_id = self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids} | ({eos_id} if eos_id is not None else set())
        self._compiled_template = compile_chat_template(chat_template) if chat_template is not None else None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, eos_token_ids: Iterable[int] = ()) -> Processor:
        """Loads the processor of the checkpoint folder ``path``."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer.json in {folder}: cannot build the processor for this checkpoint")
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        special_tokens = _named_special_tokens(folder, tokenizer_config)
        # The video placeholder has no name in Gemma 4's tokenizer config; config.json has its id.
        video_id = _read_json(folder / "config.json").get("video_token_id")
        if "video_token" not in special_tokens and isinstance(video_id, int) and tokenizer.id_to_token(video_id):
            special_tokens["video_token"] = tokenizer.id_to_token(video_id)
        return cls(
            tokenizer,
            _find_chat_template(folder, tokenizer_config),
            special_tokens,
            eos_token_ids,
            *_media_processors(folder),
            audio_feature_extractor=_audio_feature_extractor(folder),
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders one conversation to the prompt string (it starts with ``<bos>``; encode it without special
        tokens), or to its token ids with ``tokenize=True``.

        ``messages`` are ``{"role", "content"}`` dicts whose content is a string or a list of parts such as
        ``{"type": "text", "text": ...}`` or ``{"type": "image"}``; extra fields (``tool_calls``,
        ``tool_responses``, ``reasoning_content``) pass through. ``tools`` are JSON-schema function declarations
        or typed, documented Python functions. Further keyword arguments become template variables, as in
        transformers.
        """
        if self._compiled_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template.jinja or chat_template entry)")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if tools is not None:
            tools = tool_schemas(list(tools))
        variables = {**self.special_tokens, "enable_thinking": enable_thinking, **template_kwargs}
        text = self._compiled_template.render(
            messages=_template_messages(messages),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; control tokens written in the text (``<|turn>``) become their single ids."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int] | mx.array | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` the control tokens are left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """Id of a single vocabulary entry (e.g. ``"<turn|>"``), or ``None`` if it is not in the vocabulary."""
        return self.tokenizer.token_to_id(token)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        *,
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        image_token_budget: int | None = None,
        video_token_budget: int | None = None,
        return_tensors: str = "mlx",
    ) -> dict[str, mx.array | np.ndarray]:
        """Tokenises a prompt (or a batch of prompts, right-padded with ``<pad>``) for the model.

        Returns ``input_ids`` and ``attention_mask`` (1 for real tokens), int32 ``[batch, length]``, as mlx arrays
        (``return_tensors="mlx"``) or numpy arrays (``"np"``). Prompts are tokenised without adding ``<bos>``:
        the chat template already starts with it.

        ``images`` (an image or a list: paths, URLs, bytes, PIL images, uint8 arrays) fill the prompts' image
        placeholders in order, at ``image_token_budget`` soft tokens at most (70, 140, 280, 560 or 1120; default
        from the checkpoint). ``videos`` (a file path, a list of frames, or a list of those) fill the video
        placeholders, each frame at ``video_token_budget``. With either, the result also holds ``pixel_values`` /
        ``image_position_ids`` and/or ``pixel_values_videos`` / ``video_position_ids``, and ``mm_token_type_ids``
        (0 text, 1 image, 2 video): pass everything but ``attention_mask`` to the model.

        ``audio`` (a clip or a list: file paths, ``(samples, sample_rate)`` pairs, or sample arrays at the model's
        rate) fills the audio placeholders in order; clips are down-mixed to mono, resampled, and must be at most
        30 s (``speech.transcribe(..., chunking=True)`` splits longer ones). The result then also holds
        ``input_features`` and ``input_features_mask``.
        """
        if text is None:
            raise ValueError("text is required")
        if return_tensors not in ("mlx", "np"):
            raise ValueError(f"return_tensors must be 'mlx' or 'np', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        outputs: dict[str, np.ndarray] = {}
        if images is not None:
            texts = self._expand_images(texts, images, image_token_budget, outputs)
        if videos is not None:
            texts = self._expand_videos(texts, videos, video_token_budget, outputs)
        if audio is not None:
            texts = self._expand_audio(texts, audio, outputs)
        encodings = [self.encode(t) for t in texts]
        length = max(map(len, encodings), default=0)
        if self.pad_token_id is None and any(len(ids) < length for ids in encodings):
            raise ValueError("cannot pad prompts of different lengths: the tokenizer has no pad_token")
        input_ids = np.full((len(texts), length), self.pad_token_id or 0, dtype=np.int32)
        attention_mask = np.zeros((len(texts), length), dtype=np.int32)
        for row, ids in enumerate(encodings):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        outputs = {"input_ids": input_ids, "attention_mask": attention_mask, **outputs}
        if images is not None or videos is not None:
            outputs["mm_token_type_ids"] = self._token_types(input_ids)
        if return_tensors == "np":
            return outputs
        return {name: mx.array(value) for name, value in outputs.items()}

    def _media_token(self, name: str) -> str:
        token = self.special_tokens.get(name)
        if token is None or self.convert_tokens_to_ids(token) is None:
            raise ValueError(f"this checkpoint's tokenizer has no {name}; it cannot take images or videos")
        return token

    def _expand_images(self, texts: list[str], images: Any, budget: int | None, outputs: dict) -> list[str]:
        if self.image_processor is None:
            raise ValueError("this checkpoint has no image processor config (processor_config.json); "
                             "it cannot take images")
        images = _flat_media(images)
        placeholder = self._media_token("image_token")
        boi, eoi = self._media_token("boi_token"), self._media_token("eoi_token")
        _check_placeholder_count(texts, placeholder, len(images), "image")
        processed = self.image_processor(images, max_soft_tokens=budget)
        outputs["pixel_values"], outputs["image_position_ids"] = processed.pixel_values, processed.position_ids
        blocks = iter(f"{boi}{placeholder * n}{eoi}" for n in processed.num_soft_tokens)
        return [_replace_each(t, placeholder, blocks) for t in texts]

    def _expand_videos(self, texts: list[str], videos: Any, budget: int | None, outputs: dict) -> list[str]:
        if self.video_processor is None:
            raise ValueError("this checkpoint has no video processor config (processor_config.json); "
                             "it cannot take videos")
        # One video is a path or a list of frames; several are a list of those.
        single = isinstance(videos, (str, Path, dict)) or (
            isinstance(videos, (list, tuple)) and videos and not isinstance(videos[0], (str, Path, list, tuple, dict))
        )
        videos = [videos] if single else list(videos)
        placeholder = self._media_token("video_token")
        boi, eoi = self._media_token("boi_token"), self._media_token("eoi_token")
        _check_placeholder_count(texts, placeholder, len(videos), "video")
        processed = self.video_processor(videos, max_soft_tokens=budget)
        outputs["pixel_values_videos"] = processed.pixel_values
        outputs["video_position_ids"] = processed.position_ids
        blocks = iter(
            " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {boi}{placeholder * n}{eoi}" for t in stamps)
            for n, stamps in zip(processed.num_soft_tokens, processed.timestamps)
        )
        return [_replace_each(t, placeholder, blocks) for t in texts]

    def _expand_audio(self, texts: list[str], audio: Any, outputs: dict) -> list[str]:
        extractor = self.audio_feature_extractor
        if extractor is None:
            raise AudioError("this checkpoint has no audio encoder (only Gemma 4 E2B and E4B take audio)")
        tokens = [self.special_tokens.get(name) for name in ("audio_token", "boa_token", "eoa_token")]
        if any(t is None or self.convert_tokens_to_ids(t) is None for t in tokens):
            raise AudioError("this checkpoint's tokenizer has no audio_token / boa_token / eoa_token")
        placeholder, boa, eoa = tokens
        clips = [prepare_audio(clip, extractor.sampling_rate) for clip in _audio_clips(audio)]
        found = sum(t.count(placeholder) for t in texts)
        if found != len(clips):
            raise AudioError(
                f"the prompt has {found} audio placeholder(s) {placeholder} but {len(clips)} audio clip(s) were "
                "given; add one {'type': 'audio'} item per clip to the chat messages"
            )
        counts = [extractor.num_audio_tokens(len(clip)) for clip in clips]
        if 0 in counts:
            raise AudioError(f"an audio clip is too short ({len(clips[counts.index(0)])} samples); "
                             "it must last at least a few milliseconds")
        outputs["input_features"], outputs["input_features_mask"] = extractor(clips)
        blocks = iter(f"{boa}{placeholder * n}{eoa}" for n in counts)
        return [_replace_each(t, placeholder, blocks) for t in texts]

    def _token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """0 for text, 1 for image soft tokens, 2 for video soft tokens (boi/eoi count as text)."""
        types = np.zeros_like(input_ids)
        for name, kind in (("image_token", 1), ("video_token", 2)):
            token = self.special_tokens.get(name)
            token_id = self.convert_tokens_to_ids(token) if token else None
            if token_id is not None:
                types[input_ids == token_id] = kind
        return types


def _audio_clips(audio: Any) -> list[Any]:
    """One clip (a path, an ``(samples, rate)`` pair or a sample array) or a list of clips, as a list."""
    if isinstance(audio, (str, Path, np.ndarray, mx.array)):
        return [audio]
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], (int, np.integer)):
        return [audio]
    return list(audio)


def _flat_media(items: Any) -> list[Any]:
    """One image or a (possibly per-prompt nested) list of images, flattened."""
    if not isinstance(items, (list, tuple)):
        return [items]
    return [item for entry in items for item in _flat_media(entry)]


def _check_placeholder_count(texts: list[str], placeholder: str, given: int, kind: str) -> None:
    found = sum(t.count(placeholder) for t in texts)
    if found != given:
        raise ImageInputError(
            f"the prompt has {found} {kind} placeholder(s) {placeholder} but {given} {kind}(s) were given; "
            f"add one {{'type': '{kind}'}} item per {kind} to the chat messages"
        )


def _replace_each(text: str, placeholder: str, replacements: Iterator[str]) -> str:
    """`text` with each occurrence of `placeholder` replaced by the next replacement."""
    parts = text.split(placeholder)
    return parts[0] + "".join(next(replacements) + part for part in parts[1:])
