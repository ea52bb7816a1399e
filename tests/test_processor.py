"""mlx_gemma4.processor renders and tokenises exactly like transformers, without importing it."""

import json
import shutil
import subprocess
import sys

import jinja2
import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma4.processor as processor_module
from mlx_gemma4.processor import Processor

transformers = pytest.importorskip("transformers")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
                "days": {"type": "integer", "description": "Number of days", "nullable": True},
                "place": {
                    "type": "object",
                    "description": "Exact location",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
                "fields": {"type": "array", "items": {"type": "string"}, "description": "Fields to return"},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Gets the time.",
        "parameters": {"type": "object", "properties": {}},
        "response": {"type": "object", "description": "The current time"},
    },
}
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather",
                                                 "arguments": {"city": "Paris", "days": 2, "fields": ["wind", "rain"]}}}

USER = {"role": "user", "content": "What is the weather like today in Paris?"}
CONVERSATIONS = {
    "single_turn": ([USER], {}),
    "system_prompt": ([{"role": "system", "content": "  You are a helpful robot.  "}, USER], {}),
    "developer_role": ([{"role": "developer", "content": "Answer briefly."}, USER], {}),
    "multi_turn_with_thinking": ([
        USER,
        {"role": "assistant", "content": "<|channel>thought\nThe user asks about weather.<channel|>It is sunny."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "model", "content": "Rain, I think.", "reasoning_content": "Check the forecast."},
        {"role": "user", "content": "Thanks!"},
    ], {}),
    "thinking_enabled": ([{"role": "system", "content": "Be careful."}, USER], {"enable_thinking": True}),
    "thinking_enabled_no_system": ([USER], {"enable_thinking": True}),
    "tools": ([USER], {"tools": [WEATHER_TOOL, TIME_TOOL]}),
    "tools_and_thinking": ([{"role": "system", "content": "Use tools."}, USER],
                           {"tools": [WEATHER_TOOL], "enable_thinking": True}),
    "tool_call_and_response": ([
        USER,
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL],
         "tool_responses": [{"name": "get_weather", "response": {"temperature": 21, "sky": "clear"}}]},
    ], {"tools": [WEATHER_TOOL]}),
    "tool_history_then_answer": ([
        USER,
        {"role": "assistant", "tool_calls": [WEATHER_CALL],
         "tool_responses": [{"name": "get_weather", "response": "sunny, 21 degrees"}]},
        {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
    ], {"tools": [WEATHER_TOOL, TIME_TOOL]}),
    "media_parts": ([{"role": "user", "content": [
        {"type": "image", "url": "cat.png"},
        {"type": "text", "text": "What is in this picture?"},
        {"type": "audio", "audio": "clip.wav"},
        {"type": "video"},
        {"type": "text", "text": " And in the clip? "},
    ]}], {}),
    "no_generation_prompt": ([USER, {"role": "assistant", "content": "It is sunny."}],
                             {"add_generation_prompt": False}),
    "unicode_and_control_text": ([{"role": "user", "content": "café 🤖 costs 12€; write <|turn> and {\"a\": [1]}"}], {}),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_checkpoints import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_render(hf_tokenizer, messages, *, add_generation_prompt=True, enable_thinking=False, **kwargs):
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            enable_thinking=enable_thinking, **kwargs)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_matches_transformers(processor, hf_tokenizer, name):
    messages, kwargs = CONVERSATIONS[name]
    text = processor.apply_chat_template(messages, **kwargs)
    assert text == hf_render(hf_tokenizer, messages, **kwargs)
    ids = processor.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert processor.decode(ids) == text == hf_tokenizer.decode(ids)
    assert processor.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["hello world", "", "  two  spaces\n\n", "<|turn>user\nhi<turn|>", "x\ty 2025 ñ"])
def test_plain_text_encoding_matches_transformers(processor, hf_tokenizer, text):
    assert processor.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert processor.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text)  # prepends <bos>
    assert processor.decode(processor.encode(text)) == text


def test_generation_prompt_shapes(processor):
    assert processor.apply_chat_template([USER]).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert processor.apply_chat_template([USER], enable_thinking=True).startswith("<bos><|turn>system\n<|think|>")
    assert processor.apply_chat_template([USER], add_generation_prompt=False).endswith("<turn|>\n")


ENVIRONMENT_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{{ bos_token }}{{ eot_token }}{{ custom | tojson }}|{{ strftime_now('%Y') }}|{{ dict(a=1) | tojson }}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 -%}
    {% generation %}[{{ m.role }}:{{ m.content }}{{ m.thinking | default('') }}]{% endgeneration %}
{% endfor %}
{{ ns.count }}{{ tools | tojson }}{{ documents | tojson }}{{ add_generation_prompt }}
"""


def test_template_environment_matches_transformers(folder, processor, hf_tokenizer):
    """trim/lstrip blocks, loop controls, generation tags, tojson, globals and special-token variables."""
    custom = Processor(processor.tokenizer, ENVIRONMENT_TEMPLATE, processor.special_tokens)
    messages = [{"role": "user", "content": "Ünïcode <b>"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "reasoning": "hm"}]
    kwargs = {"custom": {"k": "é", "n": [1, 2.5, None, True]}, "tools": [TIME_TOOL],
              "documents": [{"title": "t", "text": "d"}], "add_generation_prompt": False}
    ours = custom.apply_chat_template(messages, **kwargs)
    theirs = hf_render(hf_tokenizer, messages, chat_template=ENVIRONMENT_TEMPLATE, **kwargs)
    assert ours == theirs
    assert '"é"' in ours and "[assistant:okhm]" in ours


def test_template_errors_and_sandbox(processor):
    raising = Processor(processor.tokenizer, "{{ raise_exception('no system role') }}", {})
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        raising.apply_chat_template([USER])
    escaping = Processor(processor.tokenizer, "{% set ns = namespace() %}{% set ns._x = 1 %}", {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        escaping.apply_chat_template([USER])
    with pytest.raises(ValueError, match="empty conversation"):
        processor.apply_chat_template([])


def test_special_tokens_and_ids(folder, processor, hf_tokenizer):
    assert (processor.bos_token, processor.eos_token, processor.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert processor.special_tokens == hf_tokenizer.special_tokens_map
    for token in ("<bos>", "<turn|>", "<|tool_response>", "<|image|>", "<|video|>", "<0x0A>", "▁robot"):
        assert processor.convert_tokens_to_ids(token) == hf_tokenizer.convert_tokens_to_ids(token)
    assert processor.convert_tokens_to_ids("not-a-token") is None  # transformers answers unk_token_id
    assert processor.eos_token_ids == {hf_tokenizer.eos_token_id}
    extra = Processor.from_pretrained(folder, eos_token_ids=[16, 9])
    assert extra.eos_token_ids == {hf_tokenizer.eos_token_id, 16, 9}


def test_call_pads_a_batch_on_the_right(processor):
    out = processor(["hello world, how are you?", "hi"])
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert isinstance(ids, mx.array) and ids.dtype == mx.int32 and mask.dtype == mx.int32
    first, second = processor.encode("hello world, how are you?"), processor.encode("hi")
    assert ids.shape == mask.shape == (2, len(first))
    assert ids[0].tolist() == first
    assert ids[1].tolist() == second + [processor.convert_tokens_to_ids("<pad>")] * (len(first) - len(second))
    assert mask.tolist() == [[1] * len(first), [1] * len(second) + [0] * (len(first) - len(second))]
    single = processor("<bos>hi", return_tensors="np")
    assert isinstance(single["input_ids"], np.ndarray) and single["input_ids"].tolist() == [[2] + second]


@pytest.mark.parametrize("kind, reason", [("images", "no image processor config"), ("videos", "no video processor config")])
def test_media_inputs_need_their_processor(processor, kind, reason):
    with pytest.raises(ValueError, match=reason):
        processor("hi", **{kind: [object()]})


def test_template_sources(folder, tmp_path):
    template = (folder / "chat_template.jinja").read_text()
    in_config = shutil.copytree(folder, tmp_path / "in_config")
    (in_config / "chat_template.jinja").unlink()
    config = json.loads((in_config / "tokenizer_config.json").read_text())
    (in_config / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert Processor.from_pretrained(in_config).chat_template == template

    in_json = shutil.copytree(folder, tmp_path / "in_json")
    (in_json / "chat_template.jinja").unlink()
    (in_json / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert Processor.from_pretrained(in_json).chat_template == template

    (in_json / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        Processor.from_pretrained(in_json).apply_chat_template([USER])


def test_missing_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"no tokenizer.json in {tmp_path}"):
        Processor.from_pretrained(tmp_path)


NO_TORCH = "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"


def test_import_does_not_pull_torch_or_transformers():
    subprocess.run([sys.executable, "-c", f"import sys, mlx_gemma4.processor; {NO_TORCH}"], check=True)


def test_processor_module_alone_does_not_import_torch_or_transformers():
    """The module by itself, outside the package: tells this module's imports apart from its siblings'."""
    # A bare parent package over the same folder: sibling imports resolve without running mlx_gemma4/__init__.
    load = (
        "import importlib, pathlib, sys, types;"
        "package = types.ModuleType('standalone');"
        f"package.__path__ = [str(pathlib.Path({processor_module.__file__!r}).parent)];"
        "sys.modules['standalone'] = package;"
        "importlib.import_module('standalone.processor');"
    )
    subprocess.run([sys.executable, "-c", load + NO_TORCH], check=True)
