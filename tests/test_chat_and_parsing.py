"""Thinking/answer/tool-call separation, tool schemas, and multi-turn chat with a persistent cache."""

import subprocess
import sys
from typing import List, Optional

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.cache import QuantizedKVCache
from mlx_gemma4.chat import ChatSession
from mlx_gemma4.loader import load
from mlx_gemma4.response import ChannelParser, GenerationResult, starts_inside_thought
from mlx_gemma4.tools import ToolCall, function_schema, parse_tool_calls


def run_parser(chunks, inside_thought=False):
    parser, out = ChannelParser(inside_thought), {"thinking": "", "answer": "", "tool_call": ""}
    for i, chunk in enumerate(chunks):
        for channel, text in parser.feed(chunk, final=i == len(chunks) - 1):
            out[channel] += text
    return out


def split_everywhere(text):
    """Every character its own delta: tags arrive split across tokens."""
    return list(text)


@pytest.mark.parametrize("split", [lambda t: [t], split_everywhere, lambda t: [t[i:i + 3] for i in range(0, len(t), 3)]])
def test_thinking_answer_and_tool_calls_are_separated(split):
    text = ('<|channel>thought\nLet me think <about> it.<channel|>The answer is 4.'
            '<|tool_call>call:add{a:1,b:<|"|>x<|"|>}<tool_call|>')
    out = run_parser(split(text))
    assert out["thinking"] == "Let me think <about> it."
    assert out["answer"] == "The answer is 4."
    assert parse_tool_calls(out["tool_call"]) == [ToolCall("add", {"a": 1, "b": "x"})]


def test_empty_thought_of_large_models_is_not_in_the_answer():
    assert run_parser(["<|channel>", "thought\n", "<channel|>", "Hi", " there"]) == {
        "thinking": "", "answer": "Hi there", "tool_call": ""}


def test_stream_that_starts_inside_a_thought():
    prompt = "<|turn>model\n<|tool_response>response:f{value:1}<tool_response|><|channel>thought\n"
    assert starts_inside_thought(prompt) and not starts_inside_thought(prompt + "x<channel|>")
    out = run_parser(split_everywhere("the tool said 1<channel|>It is 1."), inside_thought=True)
    assert out == {"thinking": "the tool said 1", "answer": "It is 1.", "tool_call": ""}


def test_text_that_only_looks_like_a_tag_prefix_is_kept():
    assert run_parser(["a <", "|chan", " b"])["answer"] == "a <|chan b"


@pytest.mark.parametrize("text,expected", [
    ('call:get_weather{city:<|"|>Paris, "FR"<|"|>,days:3}', [ToolCall("get_weather", {"city": 'Paris, "FR"', "days": 3})]),
    ('<|tool_call>call:f{x:{y:[1,2,<|"|>a}b<|"|>]},ok:true}<tool_call|>', [ToolCall("f", {"x": {"y": [1, 2, "a}b"]}, "ok": True})]),
    ('call:f{a:1}<tool_call|><|tool_call>call:g{}', [ToolCall("f", {"a": 1}), ToolCall("g", {})]),
    ('call:f{"a": "b", "n": null}', [ToolCall("f", {"a": "b", "n": None})]),
    ('f{a:-1.5e3}', [ToolCall("f", {"a": -1500.0})]),
    ('call:f({"a": 2})', [ToolCall("f", {"a": 2})]),
    ('{"name": "f", "arguments": {"a": [true, false]}}', [ToolCall("f", {"a": [True, False]})]),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', [ToolCall("f", {"a": 1})]),
])
def test_tool_call_surface_forms(text, expected):
    assert parse_tool_calls(text) == expected


def test_unparseable_tool_call_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot parse tool call"):
        parse_tool_calls("call:f{a:")


def get_weather(city: str, days: int = 1, unit: Optional[str] = None, hours: List[int] = ()) -> str:
    """Weather forecast for a city.

    Args:
        city: the city name,
            with country.
        days: how many days
    """


def test_function_schema_from_type_hints_and_docstring():
    schema = function_schema(get_weather)["function"]
    assert schema["name"] == "get_weather" and schema["description"] == "Weather forecast for a city."
    props = schema["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city name, with country."}
    assert props["days"] == {"type": "integer", "description": "how many days"}
    assert props["unit"] == {"type": "string", "nullable": True}
    assert props["hours"] == {"type": "array", "items": {"type": "integer"}}
    assert schema["parameters"]["required"] == ["city"]


def test_generation_result_collects_channels():
    class R:
        def __init__(self, channel, text):
            self.channel, self.text, self.finish_reason = channel, text, None
            self.prompt_tokens = self.generation_tokens = 1
            self.prompt_tps = self.generation_tps = self.peak_memory_gb = 0.0
            self.draft_acceptance = None
    result = GenerationResult.collect([R("thinking", "hmm "), R("answer", " Yes "), R("tool_call", "call:f{a:1}")])
    assert (result.thinking, result.answer, result.tool_calls) == ("hmm", "Yes", [ToolCall("f", {"a": 1})])


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint("e2b", sliding_window=16))


def one_shot_logprobs(model, processor, messages, **template):
    ids = processor.encode(processor.apply_chat_template(messages, **template))
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits)), len(ids)


def chat_turn(session, text):
    """Run one turn; return the first step's log-probabilities and the prompt's length."""
    responses = list(session.send(text, max_tokens=12, return_logprobs=True))
    return np.array(responses[0].logprobs), len(session.tokens) - responses[-1].generation_tokens


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_turns_reuse_the_cache_and_match_a_fresh_run(loaded, thinking):
    """The fixture template drops the generation prompt's empty thought from
    history, so every turn exercises the rewind to the last user turn."""
    model, processor = loaded
    session = ChatSession(model, processor, system="be brief", enable_thinking=thinking)
    earlier = 0  # tokens of the conversation up to the end of the previous user turn
    for text in ["tell me about the sea", "and the river", "now the sky please, in many words"]:
        got, length = chat_turn(session, text)
        asked = session.messages[:-1]
        reference, ref_length = one_shot_logprobs(model, processor, asked, enable_thinking=thinking)
        assert length == ref_length
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
        # Only the rewritten last reply and the new user turn are fed, never earlier turns.
        assert 0 < session.prefilled_tokens <= length - earlier
        earlier = len(processor.encode(processor.apply_chat_template(
            asked, add_generation_prompt=False, enable_thinking=thinking)))
    assert length > 3 * 16  # the conversation runs well past the sliding window


# The first turn leaves 42 tokens cached, the second 86: with a start of 50 the cache is saved in floats and
# quantized during the second turn.
@pytest.mark.parametrize("cache_options", [{}, {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0},
                                           {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 50}])
def test_prompt_cache_save_and_load(loaded, tmp_path, cache_options):
    model, processor = loaded
    session = ChatSession(model, processor, **cache_options)
    chat_turn(session, "tell me about the sea")
    session.save(str(tmp_path / "cache.safetensors"))
    saved = [(getattr(c, "quantized", None), getattr(c, "start", None)) for c in session.cache]
    expected, _ = chat_turn(session, "and the river")

    restored = ChatSession(model, processor, **cache_options)
    restored.load(str(tmp_path / "cache.safetensors"))
    assert [type(c) for c in restored.cache] == [type(c) for c in session.cache]
    assert [(getattr(c, "quantized", None), getattr(c, "start", None)) for c in restored.cache] == saved
    restored.messages = session.messages[:2]
    got, _ = chat_turn(restored, "and the river")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    if "kv_bits" in cache_options:  # by now quantized, whatever the start
        assert all(c.quantized for c in restored.cache if isinstance(c, QuantizedKVCache))


def test_interrupted_turn_leaves_a_consistent_session(loaded):
    model, processor = loaded
    session = ChatSession(model, processor)
    chat_turn(session, "tell me about the sea")
    stream = session.send("and the river", max_tokens=12)
    next(stream)
    stream.close()  # what Ctrl-C in the REPL does to the generator
    got, _ = chat_turn(session, "and the sky")
    reference, _ = one_shot_logprobs(model, processor, session.messages[:-1])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_tool_call_round_trip(loaded):
    """A parsed call and the tool's response feed back as the same model turn."""
    model, processor = loaded
    session = ChatSession(model, processor, tools=[get_weather])
    list(session.send("weather in Paris?", max_tokens=4))
    session.messages[-1]["tool_calls"] = [ToolCall("get_weather", {"city": "Paris"}).as_message_item()]
    got = list(session.send(tool_responses=[{"name": "get_weather", "response": {"temp": 21}}], max_tokens=4,
                            return_logprobs=True))
    prompt = processor.apply_chat_template(session.messages[:-1] if "tool_responses" not in session.messages[-1]
                                           else session.messages, tools=session.tools)
    assert "<|tool_response>response:get_weather{temp:21}<tool_response|>" in prompt
    assert got[0].logprobs is not None


def test_chat_repl_end_to_end(tiny_checkpoint, tmp_path):
    cache_file = tmp_path / "c.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma4.chat", "--model", str(tiny_checkpoint("e2b", sliding_window=16)),
         "--max-tokens", "5", "--temp", "0"],
        input=f"hello\n/save {cache_file}\nagain\n/reset\n/quit\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Generation: 5 tokens") == 2
    assert "[conversation reset]" in result.stdout and cache_file.is_file()


def one_shot_media_logprobs(model, processor, messages, images, audio):
    text = processor.apply_chat_template(messages)
    inputs = processor(text, images=images or None, audio=audio or None)
    inputs.pop("attention_mask")
    logits = model(inputs.pop("input_ids"), **inputs)[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits))


@pytest.mark.parametrize("variant", ["26b", "e2b"])
def test_chat_with_images_and_audio_matches_a_fresh_run(tiny_checkpoint, variant):
    """Media arrive in several turns; each turn encodes only its own and feeds
    only the new tokens, and still equals one call on the whole conversation."""
    from PIL import Image

    model, processor = load(tiny_checkpoint(variant, sliding_window=16))
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(2)]
    clip = (0.3 * np.sin(np.linspace(0, 800, 8000))).astype(np.float32) if variant == "e2b" else None
    session = ChatSession(model, processor)
    turns = [("what is this?", [pictures[0]], []), ("and this one?", [pictures[1]], [clip] if clip is not None else []),
             ("compare them", [], [])]
    for text, images, audio in turns:
        responses = list(session.send(text, images=images, audio=audio, max_tokens=6, return_logprobs=True))
        reference = one_shot_media_logprobs(model, processor, session.messages[:-1], session.images, session.audio)
        np.testing.assert_allclose(np.array(responses[0].logprobs), reference, rtol=0,
                                   atol=1e-4 * np.abs(reference).max())
    assert len(model.encoder_outputs) >= 2


def test_chat_repl_in_a_pseudo_terminal(tiny_checkpoint, tmp_path):
    """As a person types it: a TTY, so thinking/tool text is dimmed with ANSI codes."""
    import os
    import pty
    import select
    import time

    main_fd, child_fd = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma4.chat", "--model", str(tiny_checkpoint("e2b", sliding_window=16)),
         "--max-tokens", "4", "--temp", "0"],
        stdin=child_fd, stdout=child_fd, stderr=child_fd, close_fds=True,
    )
    os.close(child_fd)
    output, deadline = b"", time.time() + 240

    def read_until(marker: bytes) -> None:
        nonlocal output
        while marker not in output and time.time() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 1)
            if ready:
                try:
                    output += os.read(main_fd, 4096)
                except OSError:
                    return

    read_until(b">> ")
    os.write(main_fd, b"hello\n")
    read_until(b"Peak memory")
    os.write(main_fd, b"/quit\n")
    assert process.wait(timeout=60) == 0
    assert b"Generation: 4 tokens" in output


def get_time(zone: str, precise: bool = False) -> str:
    """Current time in a time zone.

    Args:
        zone: IANA name of the zone
        precise: include seconds
    """


def test_python_function_tools_render_as_transformers_renders_them(tiny_checkpoint):
    from transformers import AutoTokenizer

    path = tiny_checkpoint("e2b")
    _, processor = load(path)
    messages = [{"role": "user", "content": "what time is it in Paris?"}]
    ours = processor.apply_chat_template(messages, tools=[get_time])
    theirs = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tools=[get_time], tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert processor.apply_chat_template(messages, tools=[get_time], tokenize=True) == processor.encode(ours)
