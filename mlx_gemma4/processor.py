"""Chat templating and tokenisation for Gemma 4 checkpoints, without torch or transformers.

``Processor`` reads a checkpoint's ``tokenizer.json`` with the ``tokenizers`` library and renders its chat template
with jinja2 in the same sandboxed environment, with the same variables, as transformers'
``PreTrainedTokenizerBase.apply_chat_template`` (``transformers/utils/chat_template_utils.py``), so prompts are
byte-identical to the ones transformers would build. Images, audio and video are not handled yet; the call
signature is already the multimodal one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
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


class Processor:
    """Turns chats and text into token ids for a Gemma 4 checkpoint (text only for now)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        special_tokens: Mapping[str, str],
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """``special_tokens`` maps names (``bos_token``, ``eot_token``, ...) to token strings; they are visible to
        the chat template. ``eos_token_ids`` are stop ids added to the tokenizer's own ``eos_token``."""
        self.tokenizer = tokenizer
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
        return cls(
            Tokenizer.from_file(str(tokenizer_file)),
            _find_chat_template(folder, tokenizer_config),
            _named_special_tokens(folder, tokenizer_config),
            eos_token_ids,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Renders one conversation to the prompt string (it starts with ``<bos>``; encode it without special tokens).

        ``messages`` are ``{"role", "content"}`` dicts whose content is a string or a list of parts such as
        ``{"type": "text", "text": ...}`` or ``{"type": "image"}``; extra fields (``tool_calls``,
        ``tool_responses``, ``reasoning_content``) pass through. ``tools`` are JSON-schema function declarations.
        Further keyword arguments become template variables, as in transformers.
        """
        if self._compiled_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template.jinja or chat_template entry)")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise TypeError("tools must be JSON-schema dicts")
        variables = {**self.special_tokens, "enable_thinking": enable_thinking, **template_kwargs}
        return self._compiled_template.render(
            messages=_template_messages(messages),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )

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
        return_tensors: str = "mlx",
    ) -> dict[str, mx.array | np.ndarray]:
        """Tokenises a prompt (or a batch of prompts, right-padded with ``<pad>``) for the model.

        Returns ``input_ids`` and ``attention_mask`` (1 for real tokens), int32 ``[batch, length]``, as mlx arrays
        (``return_tensors="mlx"``) or numpy arrays (``"np"``). Prompts are tokenised without adding ``<bos>``:
        the chat template already starts with it.
        """
        for name, value in (("image", images), ("audio", audio), ("video", videos)):
            if value is not None:
                raise ValueError(f"{name} input is not supported by this processor yet (text only)")
        if text is None:
            raise ValueError("text is required")
        if return_tensors not in ("mlx", "np"):
            raise ValueError(f"return_tensors must be 'mlx' or 'np', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        encodings = [self.encode(t) for t in texts]
        length = max(map(len, encodings), default=0)
        if self.pad_token_id is None and any(len(ids) < length for ids in encodings):
            raise ValueError("cannot pad prompts of different lengths: the tokenizer has no pad_token")
        input_ids = np.full((len(texts), length), self.pad_token_id or 0, dtype=np.int32)
        attention_mask = np.zeros((len(texts), length), dtype=np.int32)
        for row, ids in enumerate(encodings):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        if return_tensors == "np":
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"input_ids": mx.array(input_ids), "attention_mask": mx.array(attention_mask)}
