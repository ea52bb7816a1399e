"""The streaming generator and its CLI, on tiny checkpoints."""

import shutil
import subprocess
import sys
from itertools import islice

import mlx.core as mx
import pytest
import torch

from mlx_gemma4.generate import generate_tokens, stream_generate
from mlx_gemma4.loader import load
from mlx_gemma4.prefill import block_spans, chunk_end
from mlx_gemma4.response import ChannelParser
from mlx_gemma4.sampling import make_sampler
from test_loading import BAD_INPUTS


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_greedy_stream_matches_transformers_generate(tiny_checkpoint, hf_model, variant):
    path = tiny_checkpoint(variant)
    model, processor = load(path)
    prompt = processor.apply_chat_template([{"role": "user", "content": "tell me a story about the sea"}])
    ids = processor.encode(prompt)
    with torch.no_grad():
        ref = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    # prefill in odd chunks, as a long prompt would be
    tokens = generate_tokens(model, mx.array(ids), prefill_step_size=7)
    assert [next(tokens)[0] for _ in range(24)] == ref
    chunks = list(stream_generate(model, processor, ids, max_tokens=24, stop_tokens=set()))
    assert sorted({c.generation_tokens for c in chunks}) == list(range(1, 25))
    assert [c.token for c in {c.generation_tokens: c for c in chunks}.values()] == ref
    assert chunks[-1].finish_reason == "length" and chunks[-1].generation_tokens == 24
    # Streaming token by token splits the text exactly as parsing the whole decode at once.
    whole = ChannelParser().feed(processor.decode(ref), final=True)
    joined = {}
    for c in chunks:
        joined[c.channel] = joined.get(c.channel, "") + c.text
    assert {k: v for k, v in joined.items() if v} == {k: "".join(t for ch, t in whole if ch == k) for k, _ in whole}


def test_long_prompts_prefill_in_chunks_whose_scores_fit_the_budget(tiny_checkpoint, hf_model, monkeypatch):
    """Chunks shrink as the cache grows so that each one's float32 scores over every key stay within
    `SCORE_BUDGET`; the tokens are still transformers'."""
    from mlx_gemma4 import prefill as prefill_module

    path = tiny_checkpoint("31b")
    model, processor = load(path)
    ids = processor.encode(processor.apply_chat_template([{"role": "user", "content": "tell me a story about "
                                                           "the sea and the river and the sky, in many words"}]))
    heads = model.config.text_config.num_attention_heads
    budget = 4 * heads * 12 * 24  # 12 queries over 24 keys
    monkeypatch.setattr(prefill_module, "SCORE_BUDGET", budget)
    chunks = []
    call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__", lambda self, x, *a, **k: chunks.append(x.shape[1]) or call(
        self, x, *a, **k))
    tokens = [t for t, _ in islice(generate_tokens(model, mx.array(ids), prefill_step_size=16), 8)]
    prefill_chunks = chunks[:-9]  # then the last prompt token and 8 steps
    assert sum(prefill_chunks) == len(ids) - 1 and prefill_chunks[0] == 16 and len(set(prefill_chunks)) > 2
    cached = 0
    for size in prefill_chunks:
        assert 4 * heads * size * (cached + size) <= budget or size == 1
        cached += size
    with torch.no_grad():
        ref = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert tokens == ref


def test_a_one_token_prompt_has_nothing_to_prefill(tiny_checkpoint, hf_model):
    path = tiny_checkpoint("31b")
    model, processor = load(path)
    first = processor.encode("hello")[:1]
    tokens = [t for t, _ in islice(generate_tokens(model, mx.array(first)), 4)]
    with torch.no_grad():
        ref = hf_model(path).generate(torch.tensor([first]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
    assert tokens == ref


def test_chunks_end_outside_image_blocks():
    """A chunk stops before a block it would cut, or takes a block it starts with whole."""
    # Each block with its begin- and end-of-image tokens.
    assert block_spans(mx.array([[-1, 0, 0, -1, -1, 1, 1, -1, -1]])) == [(0, 4), (4, 8)]
    assert block_spans(None) == []
    blocks = [(10, 30), (40, 45)]
    assert chunk_end(0, 8, 100, blocks) == 8
    assert chunk_end(8, 8, 100, blocks) == 10
    assert chunk_end(10, 8, 100, blocks) == 30
    assert chunk_end(30, 12, 100, blocks) == 40
    assert chunk_end(30, 10, 100, blocks) == 40
    assert chunk_end(95, 8, 100, blocks) == 100


def test_generation_stops_at_eos_without_emitting_it(tiny_checkpoint):
    model, processor = load(tiny_checkpoint("e2b"))
    ids = processor.encode("the sea")
    first, _ = next(generate_tokens(model, mx.array(ids)))
    chunks = list(stream_generate(model, processor, ids, max_tokens=10, stop_tokens={first}))
    assert len(chunks) == 1 and chunks[0].finish_reason == "stop" and chunks[0].text == ""


def test_stopping_a_stream_waits_for_the_step_computed_ahead(tiny_checkpoint, monkeypatch):
    # Exiting with that step still queued can abort the process in MLX's heap teardown.
    model, processor = load(tiny_checkpoint("e2b"))
    waits = []
    real = mx.synchronize
    monkeypatch.setattr(mx, "synchronize", lambda *a, **k: (waits.append(a), real(*a, **k)))
    chunks = list(stream_generate(model, processor, "the sea", max_tokens=3, stop_tokens=set()))
    assert len(chunks) >= 3 and waits


THREADS_SCRIPT = """
import sys, threading
from itertools import islice
import mlx.core as mx
from mlx_gemma4.generate import generate_tokens
from mlx_gemma4.loader import load_model
model = load_model(sys.argv[1], text_only=True)
prompt = mx.array(list(range(3, 83)))
out = {}
def work(name):
    out[name] = [t for t, _ in islice(generate_tokens(model, prompt), 4)]
for names in (["worker"], ["a", "b"]):  # first use in a thread, then two threads at once
    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    [t.start() for t in threads]; [t.join() for t in threads]
work("main")
print(len({tuple(v) for v in out.values()}), len(out))
"""


def test_generation_from_worker_threads_matches_and_exits_cleanly(tiny_checkpoint):
    """MLX streams belong to the thread that made them, and a process whose threads
    computed with MLX used to abort at exit (see `streams._ThreadState`)."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tiny_checkpoint("e2b", with_towers=False))],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "4"]  # one token sequence, from all four generations


def test_sampler_filters():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    mx.random.seed(0)
    draws = lambda sampler: {sampler(logprobs).item() for _ in range(200)}
    assert draws(make_sampler(temp=0)) == {0}
    assert draws(make_sampler(temp=1.0, top_k=2)) == {0, 1}
    assert draws(make_sampler(temp=1.0, top_p=0.7)) == {0, 1}
    assert draws(make_sampler(temp=1.0, min_p=0.2)) == {0, 1, 2}
    assert draws(make_sampler(temp=1.0)) == {0, 1, 2, 3}


def test_cli_streams_text_and_stats(tiny_checkpoint):
    result = run_cli("--model", str(tiny_checkpoint("e2b")), "--prompt", "-", "--max-tokens", "8", "--temp", "0",
                     stdin="the sea")
    assert result.returncode == 0, result.stderr
    assert "Generation: 8 tokens" in result.stdout and "Peak memory" in result.stdout
    quantized = run_cli("--model", str(tiny_checkpoint("e2b")), "--prompt", "the sea", "--max-tokens", "8",
                        "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0")
    assert quantized.returncode == 0, quantized.stderr
    assert "Generation: 8 tokens" in quantized.stdout


@pytest.mark.parametrize("damage,message", BAD_INPUTS[:5], ids=[d.__name__ for d, _ in BAD_INPUTS[:5]])
def test_cli_bad_checkpoint_is_one_line_error(tiny_checkpoint, tmp_path, damage, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("e2b"), folder)
    damage(folder)
    result = run_cli("--model", str(folder), "--prompt", "hi")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("model", ["/no/such/folder", "nobody/not-a-cached-repo"])
def test_cli_unresolvable_model_is_one_line_error(model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma4.generate", "--model", model, "--prompt", "hi"],
        capture_output=True, text=True, env={"PATH": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--image", "/no/such.png"], "/no/such.png: no such file"),
    (["--tools", "/no/tools.json"], "--tools /no/tools.json: cannot read"),
    (["--kv-bits", "4", "--max-kv-size", "64"], "kv_bits and max_kv_size both shrink"),
    (["--kv-bits", "4"], "a KV group size of 64 does not divide the global layers' head dim 32"),
    (["--quantized-kv-start", "-1"], "--quantized-kv-start must be 0 or more"),
])
def test_cli_bad_flag_values_are_one_line_errors(tiny_checkpoint, flags, message):
    result = run_cli("--model", str(tiny_checkpoint("e2b")), *flags)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_thinking_and_tools(tiny_checkpoint, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "add", "description": "add", "parameters": '
                     '{"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}}}]')
    result = run_cli("--model", str(tiny_checkpoint("e2b")), "--prompt", "hi", "--max-tokens", "4", "--temp", "0",
                     "--thinking", "--no-show-thinking", "--tools", str(tools), "--max-kv-size", "64")
    assert result.returncode == 0, result.stderr


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_checkpoint):
    model, processor = load(tiny_checkpoint("e2b"))
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's"):
        next(stream_generate(model, processor, "hello", max_tokens=limit))


def test_sampling_with_a_seed_is_reproducible(tiny_checkpoint):
    model, processor = load(tiny_checkpoint("e2b"))
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        sampler = make_sampler(temp=1.0, top_p=0.95, top_k=64)
        runs.append([r.token for r in stream_generate(model, processor, "the sea", max_tokens=12, sampler=sampler)])
    assert runs[0] == runs[1]


def test_text_stream_survives_invalid_utf8_from_byte_tokens(tiny_checkpoint):
    """Byte-fallback tokens that are not valid UTF-8, then a normal token: the
    tokenizers DecodeStream raises there; the stream must go on."""
    from mlx_gemma4.generate import TextStream
    from tiny_checkpoints import token_id

    _, processor = load(tiny_checkpoint("e2b"))
    ids = [token_id("<0x41>"), token_id("<0xF1>"), processor.encode(" the")[0], processor.encode("sea")[0]]
    stream = TextStream(processor)
    text = "".join(stream.add(t) for t in ids) + stream.flush()
    # What was shown stays shown ("A"); the invalid byte becomes U+FFFD; the rest follows intact.
    assert text == "A\ufffd" + processor.decode(ids[2:])
