"""Tool calling: JSON schemas from Python functions, and parsing Gemma 4 tool calls.

Gemma 4 writes calls as `call:name{key:value,...}` between `<|tool_call>` and
`<tool_call|>`, with strings delimited by `<|"|>` and bare keys: not JSON.
In the wild the same call also appears with plain JSON quotes, with
`name(...)` instead of `name{...}`, without the `call:` prefix, or as an
OpenAI-style JSON object; `parse_tool_calls` accepts all of these.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Union

STRING_DELIMITER = '<|"|>'

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


@dataclass
class ToolCall:
    """One function call the model asked for."""

    name: str
    arguments: Dict[str, Any] = field(default_factory=dict)

    def as_message_item(self) -> dict:
        """The `tool_calls` entry a chat template expects in the model's turn."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _type_schema(annotation: Any) -> dict:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        options = [a for a in args if a is not type(None)]
        schema = _type_schema(options[0]) if len(options) == 1 else {"type": [_type_schema(a)["type"] for a in options]}
        if len(options) < len(args):
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        return {"type": _JSON_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (list, tuple, set):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    raise ValueError(f"tool parameter type {annotation!r} has no JSON schema; use str, int, float, bool, list or dict")


def _docstring_parts(doc: str) -> tuple:
    """The summary and the `Args:` descriptions of a Google-style docstring."""
    summary, args, section, current = [], {}, None, None
    for line in inspect.cleandoc(doc or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            section = "args"
        elif stripped.endswith(":") and stripped[:-1] in ("Returns", "Raises", "Yields", "Examples"):
            section = "other"
        elif section == "args" and (match := re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)):
            current = match.group(1)
            args[current] = match.group(3)
        elif section == "args" and current and stripped:
            args[current] += " " + stripped
        elif section is None and stripped:
            summary.append(stripped)
    return " ".join(summary), args


def function_schema(func: Callable) -> dict:
    """An OpenAI-style tool schema from a function's type hints and docstring."""
    hints = typing.get_type_hints(func)
    summary, descriptions = _docstring_parts(func.__doc__)
    properties, required = {}, []
    for name, param in inspect.signature(func).parameters.items():
        if name not in hints:
            raise ValueError(f"tool {func.__name__}: parameter '{name}' needs a type hint")
        properties[name] = _type_schema(hints[name])
        if name in descriptions:
            properties[name]["description"] = descriptions[name]
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {
        "type": "function",
        "function": {
            "name": func.__name__,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def tool_schemas(tools: List[Union[dict, Callable]]) -> List[dict]:
    """Schemas for a mix of JSON-schema dicts and Python functions."""
    return [tool if isinstance(tool, dict) else function_schema(tool) for tool in tools]


def _balanced_end(text: str, start: int) -> int:
    """Index just past the bracket group opening at `start`, skipping strings."""
    closing = {"{": "}", "[": "]", "(": ")"}
    stack, i = [], start
    while i < len(text):
        if text.startswith(STRING_DELIMITER, i):
            end = text.find(STRING_DELIMITER, i + len(STRING_DELIMITER))
            i = len(text) if end < 0 else end + len(STRING_DELIMITER)
            continue
        char = text[i]
        if char == '"':
            match = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i)
            i = match.end() if match else len(text)
            continue
        if char in closing:
            stack.append(closing[char])
        elif stack and char == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return -1


def _to_json(arguments: str) -> str:
    """Gemma's argument syntax to JSON: delimited strings, bare keys."""
    parts, i = [], 0
    while i < len(arguments):
        if arguments.startswith(STRING_DELIMITER, i):
            end = arguments.find(STRING_DELIMITER, i + len(STRING_DELIMITER))
            end = len(arguments) if end < 0 else end
            parts.append(json.dumps(arguments[i + len(STRING_DELIMITER):end]))
            i = end + len(STRING_DELIMITER)
        elif arguments[i] == '"':
            match = re.compile(r'"(?:[^"\\]|\\.)*"').match(arguments, i)
            end = match.end() if match else len(arguments)
            parts.append(arguments[i:end])
            i = end
        else:
            match = re.compile(r"[^\"<]+|<").match(arguments, i)
            # Quote bare keys: an identifier right after '{' or ',' and before ':'.
            parts.append(re.sub(r"(?<=[{,])\s*([A-Za-z_][\w.-]*)\s*:", r'"\1":', match.group()))
            i = match.end()
    return "".join(parts)


def _parse_arguments(arguments: str) -> Dict[str, Any]:
    if arguments.startswith("(") and arguments.endswith(")"):
        arguments = arguments[1:-1].strip() or "{}"
    value = json.loads(_to_json(arguments))
    if not isinstance(value, dict):
        raise ValueError("tool call arguments are not an object")
    return value


def parse_tool_calls(text: str) -> List[ToolCall]:
    """Every tool call in `text` (the content of one or more `<|tool_call>` blocks).

    Raises ValueError naming the text when a call cannot be parsed.
    """
    text = text.replace("<|tool_call>", " ").replace("<tool_call|>", " ").strip()
    calls, i = [], 0
    while i < len(text):
        if text[i] in " \n\t,;":
            i += 1
            continue
        if text[i] == "{":  # OpenAI-style {"name": ..., "arguments": {...}}
            end = _balanced_end(text, i)
            obj = json.loads(_to_json(text[i:end])) if end > 0 else None
            if not isinstance(obj, dict) or "name" not in obj:
                raise ValueError(f"cannot parse tool call: {text[i:i + 80]!r}")
            arguments = obj.get("arguments", obj.get("parameters", {}))
            calls.append(ToolCall(obj["name"], json.loads(arguments) if isinstance(arguments, str) else arguments))
            i = end
            continue
        match = re.compile(r"(?:call:)?\s*([A-Za-z_][\w.-]*)\s*([{(])").match(text, i)
        end = _balanced_end(text, match.start(2)) if match else -1
        if end < 0:
            raise ValueError(f"cannot parse tool call: {text[i:i + 80]!r}")
        try:
            calls.append(ToolCall(match.group(1), _parse_arguments(text[match.start(2):end])))
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse tool call arguments of {match.group(1)}: {e}") from None
        i = end
    return calls
