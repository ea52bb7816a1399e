"""Speculative decoding with an MTP drafter: the drafter against transformers' Gemma4AssistantForCausalLM and its
candidate generator, and the speculative stream against plain decoding (tokens, log-probabilities, caches)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import CheckpointError, load, load_drafter
from mlx_gemma4 import speculative
from mlx_gemma4.cache import RotatingKVCache
from mlx_gemma4.cli import main as cli_main
from mlx_gemma4.generate import generate_tokens, stream_generate
from mlx_gemma4.sampling import make_sampler, make_logits_processors

# (target variant, clustered LM head): the E-series drafters have the clustered head, the 31B one a dense head.
CASES = [("e2b", True), ("31b", False), ("26b", False)]
PROMPT = list(range(300, 320))  # plain text ids of the tiny tokenizer; 20 tokens, past the window of 16


@pytest.fixture(scope="module")
def tiny_drafter(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_checkpoints import build_drafter

    built = {}

    def get(variant: str, ordered: bool) -> Path:
        if (variant, ordered) not in built:
            folder = tmp_path_factory.mktemp(f"drafter-{variant}-{ordered}")
            built[variant, ordered] = build_drafter(folder, variant, ordered=ordered)
        return built[variant, ordered]

    return get


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tiny_drafter):
    """`pair(variant, ordered)`: our (model, drafter) and their folders, loaded once."""
    loaded = {}

    def get(variant: str, ordered: bool):
        if (variant, ordered) not in loaded:
            target_dir = tiny_checkpoint(variant, with_towers=False)
            drafter_dir = tiny_drafter(variant, ordered)
            model, _ = load(target_dir, dtype="float32")
            loaded[variant, ordered] = model, load_drafter(drafter_dir, model), target_dir, drafter_dir
        return loaded[variant, ordered]

    return get


def _transformers_drafts(target, drafter_dir: Path, outputs, input_ids: list, kept: Optional[int]) -> tuple:
    """Three drafts (as ids) and their logits from transformers' Gemma-4 candidate generator, fed the target's
    `outputs` (with hidden states and shared K/V): after the prompt's prefill (`kept` None), or after a verifying
    pass whose first `kept` drafts were accepted. `input_ids` end with the token the drafts follow."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma4AssistantForCausalLM, GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    assistant = Gemma4AssistantForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assistant.generation_config.num_assistant_tokens = 3
    generator = SinglePositionMultiTokenCandidateGenerator(assistant, target.get_input_embeddings(),
                                                           GenerationConfig(max_length=1000))
    generator.is_main_model_prefill = kept is None
    with torch.no_grad():
        candidates, logits = generator.get_candidates(torch.tensor([input_ids]), model_kwargs={}, model_outputs=outputs,
                                                      is_first_iteration=False, n_last_matches=kept or 0)
    return candidates[0, -3:].tolist(), logits


@pytest.mark.parametrize("variant,ordered", CASES)
@pytest.mark.parametrize("prompt_length", [10, 16, 17, 30])
def test_drafts_match_transformers(pair, hf_model, variant, ordered, prompt_length):
    """Three drafts after a prefill (shorter and longer than the sliding window): the same tokens as transformers'
    Gemma-4 candidate generator, and the same logits at each step within 1e-4 of their range. Past the window its
    sliding layers see one position more than the target's sliding cache keeps."""
    torch = pytest.importorskip("torch")
    model, drafter, target_dir, drafter_dir = pair(variant, ordered)
    prompt = list(range(300, 300 + prompt_length))
    target = hf_model(target_dir)
    with torch.no_grad():
        out = target(input_ids=torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
    first = out.logits[0, -1].argmax().item()
    their_drafts, their_logits = _transformers_drafts(target, drafter_dir, out, prompt + [first], kept=None)

    # The prompt goes in as our loop feeds it: all but the last token, then the last one.
    cache = model.make_cache()
    target_kv = speculative.DrafterKV(model, drafter, cache, 3)
    model(mx.array([prompt[:-1]]), cache)
    logits, hidden = model(mx.array([prompt[-1:]]), cache, return_hidden=True)
    assert mx.argmax(logits[0, -1]).item() == first
    shared = target_kv.shared()
    drafts = speculative.propose(drafter, model, mx.array([first]), hidden[:, -1:], shared, len(prompt), 3)
    assert drafts.tolist() == their_drafts

    # Each step's logits, fed the same tokens.
    state = hidden[:, -1:]
    for step, token in enumerate([first] + their_drafts[:-1]):
        h, state = drafter(model.language_model.model.embed(mx.array([[token]])), state, shared, len(prompt))
        ids, ours = drafter.candidate_logits(h)
        theirs = their_logits[0, step].numpy()
        if ids is not None:  # the clustered head scores only its candidates; the rest is filled below them
            ids = np.array(ids[0, 0])
            assert set(ids.tolist()) == set(np.flatnonzero(theirs > theirs.min()).tolist())
            theirs = theirs[ids]
        ours = np.array(ours[0, 0])
        assert np.abs(ours - theirs).max() <= 1e-4 * np.ptp(theirs)


@pytest.mark.parametrize("variant,ordered", CASES[:2])
def test_drafts_after_a_verifying_pass_match_transformers(pair, hf_model, variant, ordered):
    """After a round whose drafts were all kept (the case transformers' loop handles exactly: it does not trim a
    rejected tail from its sliding K/V), the next drafts read the verifying pass's hidden state and K/V, including
    the sliding position the pass pushed out of the cache."""
    torch = pytest.importorskip("torch")
    model, drafter, target_dir, drafter_dir = pair(variant, ordered)
    prompt, block = PROMPT, [330, 331, 332, 333]  # the last token and three kept drafts
    target = hf_model(target_dir)
    with torch.no_grad():
        out = target(input_ids=torch.tensor([prompt]), use_cache=True)
        out = target(input_ids=torch.tensor([block]), cache=out.cache, output_hidden_states=True,
                     return_shared_kv_states=True)
    bonus = out.logits[0, -1].argmax().item()
    their_drafts, _ = _transformers_drafts(target, drafter_dir, out, prompt + block + [bonus], kept=len(block) - 1)

    cache = model.make_cache()
    target_kv = speculative.DrafterKV(model, drafter, cache, 3)
    model(mx.array([prompt]), cache)
    logits, hidden = model(mx.array([block]), cache, return_hidden=True)
    assert mx.argmax(logits[0, -1]).item() == bonus
    drafts = speculative.propose(drafter, model, mx.array([bonus]), hidden[:, -1:], target_kv.shared(),
                                 len(prompt) + len(block), 3)
    assert drafts.tolist() == their_drafts


def test_the_drafter_reads_window_plus_one_sliding_positions_after_a_rejected_round(pair):
    """After a verifying pass whose drafts were all rejected, the drafter still reads window + 1 sliding positions
    (the reserved room is k + 1, not k), the same keys and values as a cache fed only the kept tokens."""
    model, drafter, _, _ = pair("e2b", True)
    window = model.config.text_config.sliding_window
    cache = model.make_cache()
    target_kv = speculative.DrafterKV(model, drafter, cache, 3)
    model(mx.array([PROMPT]), cache)
    model(mx.array([[330, 331, 332, 333]]), cache)
    for c in cache:
        c.trim(3)
    reference = model.make_cache()
    reference_kv = speculative.DrafterKV(model, drafter, reference, 10)
    model(mx.array([PROMPT + [330]]), reference)
    ours, theirs = target_kv.shared(), reference_kv.shared()
    for kind, (keys, values) in ours.items():
        assert keys.shape[2] == (window + 1 if kind == "sliding_attention" else len(PROMPT) + 1)
        for a, b in zip((keys, values), theirs[kind]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def _plain(model, prompt, n, sampler=None, **cache_options):
    cache = model.make_cache(**cache_options)
    out = list(itertools.islice(generate_tokens(model, mx.array(prompt), cache=cache, sampler=sampler), n))
    return [t for t, _ in out], [np.array(p) for _, p in out], cache


def _speculative(model, drafter, prompt, n, sampler=None, draft_tokens=3, **cache_options):
    cache, stats = model.make_cache(**cache_options), {}
    stream = speculative.speculative_tokens(model, drafter, mx.array(prompt), cache=cache, sampler=sampler,
                                            draft_tokens=draft_tokens, stats=stats)
    out = list(itertools.islice(stream, n))
    stream.close()
    return [t for t, _ in out], [np.array(p) for _, p in out], cache, stats


def _oracle(reference, prompt_length, vocab):
    """A stand-in for `speculative.propose` that drafts the reference continuation, with a wrong token at a place
    that changes from round to round (none, the first, the second), so rounds accept all, none or some drafts."""
    rounds = itertools.count()

    def propose(drafter, model, last, hidden, shared, position, k):
        start = position - prompt_length + 1  # index in `reference` of the token after `last`
        drafts = list(reference[start:start + k]) + [0] * k
        wrong = next(rounds) % (k + 1)
        if wrong < k:
            drafts[wrong] = (drafts[wrong] + 1) % vocab
        return mx.array(drafts[:k])

    return propose


def _assert_same_stream(expected, got):
    tokens, logprobs = expected[:2]
    assert got[0] == tokens
    for ours, theirs in zip(got[1], logprobs):
        assert np.abs(ours - theirs).max() <= 1e-4 * np.ptp(theirs[np.isfinite(theirs)])


@pytest.mark.parametrize("variant,ordered", CASES)
def test_speculative_stream_is_the_plain_stream(pair, variant, ordered, monkeypatch):
    """Past the sliding window, with the drafter and with drafts that are accepted whole, partly or not at all:
    the tokens of plain greedy decoding, and its log-probabilities within 1e-4 of their range."""
    model, drafter, _, _ = pair(variant, ordered)
    n = 30
    expected = _plain(model, PROMPT, n)
    _assert_same_stream(expected, _speculative(model, drafter, PROMPT, n))

    monkeypatch.setattr(speculative, "propose", _oracle(expected[0], len(PROMPT), model.config.text_config.vocab_size))
    got = _speculative(model, drafter, PROMPT, n)
    _assert_same_stream(expected, got)
    stats = got[3]
    assert 0 < stats["accepted"] < stats["drafted"]


@pytest.mark.parametrize("variant,ordered", [("e2b", True), ("31b", False)])
def test_speculative_stream_over_a_quantized_cache_is_the_plain_stream(pair, variant, ordered, monkeypatch):
    """With `kv_bits`, the drafter and the verifying passes read the global layers' packed keys and values."""
    model, drafter, _, _ = pair(variant, ordered)
    options = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0}
    expected = _plain(model, PROMPT, 20, **options)
    _assert_same_stream(expected, _speculative(model, drafter, PROMPT, 20, **options))
    monkeypatch.setattr(speculative, "propose", _oracle(expected[0], len(PROMPT), model.config.text_config.vocab_size))
    got = _speculative(model, drafter, PROMPT, 20, **options)
    _assert_same_stream(expected, got)
    assert 0 < got[3]["accepted"] < got[3]["drafted"]


@pytest.mark.parametrize("variant,ordered", [("e2b", True), ("26b", False)])
def test_gpu_route_speculative_stream_is_the_plain_stream(pair, variant, ordered, monkeypatch):
    """The layers' GPU route (what a Mac runs: no CPU streams, experts gathered in the kernel), drafts partly kept."""
    from mlx_gemma4 import precision

    model, drafter, _, _ = pair(variant, ordered)
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    expected = _plain(model, PROMPT, 20)
    monkeypatch.setattr(speculative, "propose", _oracle(expected[0], len(PROMPT), model.config.text_config.vocab_size))
    _assert_same_stream(expected, _speculative(model, drafter, PROMPT, 20))


def test_verifying_passes_write_into_the_same_cache_buffers(pair):
    """Round after round (here every draft rejected: k + 1 tokens written, k trimmed), each cache keeps one buffer:
    the verifying pass writes in place, nothing is reallocated or copied."""
    model, drafter, _, _ = pair("e2b", True)
    cache, buffers = model.make_cache(), {}

    def address(a):
        view = np.asarray(a)  # shares the buffer; dropped at once, so MLX may still write in place
        return view.__array_interface__["data"][0]

    stream = speculative.speculative_tokens(model, drafter, mx.array(list(range(300, 340))), cache=cache,
                                            draft_tokens=3)
    for _ in zip(range(24), stream):
        for i, c in enumerate(cache):
            mx.eval(c.keys)
            buffers.setdefault(i, set()).add((c.keys.shape[2], address(c.keys)))
    stream.close()
    assert all(len(seen) == 1 for seen in buffers.values()), buffers


def test_stopping_leaves_the_cache_of_plain_decoding(pair, monkeypatch):
    """Wherever the caller stops (inside a round of accepted drafts or on its last token), the cache holds the
    prompt and exactly the tokens yielded, as plain decoding leaves it; and the next turn continues alike."""
    model, drafter, _, _ = pair("e2b", True)
    reference = _plain(model, PROMPT, 12)[0]
    monkeypatch.setattr(speculative, "propose", _oracle(reference, len(PROMPT), model.config.text_config.vocab_size))
    for n in range(1, 9):
        _, _, plain_cache = _plain(model, PROMPT, n)
        _, _, cache, _ = _speculative(model, drafter, PROMPT, n)
        assert [c.offset for c in cache] == [c.offset for c in plain_cache]
        for ours, theirs in zip(cache, plain_cache):
            for a, b in zip(ours.state, theirs.state):  # a sliding cache keeps k + 1 more positions with a drafter
                np.testing.assert_allclose(np.array(a)[:, :, -b.shape[2]:], np.array(b), rtol=1e-5, atol=1e-5)


def test_chat_turns_with_a_drafter_are_the_turns_without(pair):
    """A chat reuses the cache across turns: with a drafter every reply, and what the cache holds, is the same."""
    from mlx_gemma4.chat import ChatSession

    model, drafter, target_dir, _ = pair("e2b", True)
    processor = load(target_dir)[1]
    transcripts = []
    for draft in ({}, {"draft_model": drafter}):
        session = ChatSession(model, processor)
        replies = ["".join(r.text for r in session.send(text, max_tokens=n, **draft))
                   for text, n in (("Hello there", 7), ("And then?", 5))]
        transcripts.append((replies, session.tokens, [c.offset for c in session.cache]))
    assert transcripts[0] == transcripts[1]
    assert transcripts[0][2][0] == len(transcripts[0][1])


def test_an_image_prompt_with_a_drafter_is_the_stream_without(tiny_checkpoint, tiny_drafter):
    """26B (bidirectional image blocks): the prompt prefills in 8-token chunks around the image, then drafts."""
    from PIL import Image

    model, processor = load(tiny_checkpoint("26b"))
    drafter = load_drafter(tiny_drafter("26b", False), model)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    streams = [[(r.token, np.array(r.logprobs)) for r in stream_generate(
        model, processor, messages, images=[picture], max_tokens=12, stop_tokens=set(), prefill_step_size=8,
        return_logprobs=True, **draft)] for draft in ({}, {"draft_model": drafter})]
    plain, drafted = ([t for t, _ in s] for s in streams)
    assert drafted == plain
    for (_, ours), (_, theirs) in zip(streams[1], streams[0]):
        assert np.abs(ours - theirs).max() <= 1e-4 * np.ptp(theirs[np.isfinite(theirs)])


def test_a_quantized_drafter_loads_and_drafts(pair, tmp_path):
    """A drafter stored quantized (as an MLX conversion would), its clustered head reading quantized rows."""
    import json

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma4.drafter import Drafter, DrafterConfig

    model, drafter, _, drafter_dir = pair("e2b", True)
    config = json.loads((drafter_dir / "config.json").read_text())
    quantized = Drafter(DrafterConfig.from_dict(config))  # the checkpoint's names (no load-time fusion)
    quantized.load_weights(list(quantized.sanitize(mx.load(str(drafter_dir / "model.safetensors"))).items()))
    nn.quantize(quantized, group_size=32, bits=8)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(quantized.parameters())))
    config["quantization"] = {"group_size": 32, "bits": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(tmp_path, model)
    assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
    expected = _plain(model, PROMPT, 12)
    got = _speculative(model, loaded, PROMPT, 12)
    _assert_same_stream(expected, got)
    # 8 bits barely move the drafts: the same as the float drafter's for the first round.
    cache = model.make_cache()
    target_kv = speculative.DrafterKV(model, drafter, cache, 3)
    logits, hidden = model(mx.array([PROMPT]), cache, return_hidden=True)
    first, shared = mx.argmax(logits[:, -1], axis=-1), target_kv.shared()
    drafts = [speculative.propose(d, model, first, hidden[:, -1:], shared, len(PROMPT), 3).tolist()
              for d in (drafter, loaded)]
    assert drafts[0] == drafts[1]


def test_sampling_path_verifies_every_position(pair):
    """A sampler (here top-k 1, so deterministic) draws the target's token at every position of the block."""
    model, drafter, _, _ = pair("31b", False)
    sampler = make_sampler(temp=0.8, top_k=1)
    expected = _plain(model, PROMPT, 20)
    _assert_same_stream(expected, _speculative(model, drafter, PROMPT, 20, sampler=sampler, draft_tokens=5))


def _visible(cache, positions):
    """Feed `positions` (each key is its own position) and return, per query, the positions it attends to."""
    n = len(positions)
    new = mx.array(positions, dtype=mx.float32).reshape(1, 1, n, 1)
    mask = cache.make_mask(n)
    keys = np.array(cache.update_and_fetch(new, new)[0])[0, 0, :, 0]
    mask = np.ones((n, keys.size), bool) if mask is None else np.broadcast_to(np.array(mask), (n, keys.size))
    return [sorted(keys[row].tolist()) for row in mask]


def test_sliding_cache_with_room_writes_blocks_in_place_and_trims():
    """With room reserved, blocks of up to extra + 1 tokens are written into the full ring (not rebuilt),
    and `trim` drops them again: every query sees exactly its window (itself and the window - 1 positions before
    it), and the cache holds the last positions kept, in order."""
    window, extra = 8, 4
    rng = np.random.default_rng(0)
    cache, kept = RotatingKVCache(window), []
    cache.reserve(extra)
    for step in range(80):
        n = 11 if step == 0 else int(rng.integers(1, extra + 2))  # a prompt chunk, then blocks and single tokens
        positions = list(range(cache.offset, cache.offset + n))
        full = cache.keys is not None and cache.keys.shape[2] == window + extra
        buffer = cache.keys
        assert _visible(cache, positions) == [list(range(max(0, q - window + 1), q + 1)) for q in positions]
        if full:  # written into the same buffer
            assert cache.keys is buffer and cache.keys.shape[2] == window + extra
        del buffer
        kept += positions
        dropped = int(rng.integers(0, n))
        cache.trim(dropped)
        kept = kept[: len(kept) - dropped]
        assert cache.offset == len(kept)
        # The last positions kept, in order (a block overwrites the oldest slots before it is trimmed), and at
        # least a window of them when up to `extra` are trimmed.
        held = np.array(cache.state[0])[0, 0, :, 0].tolist()
        assert held == kept[-len(held):] and len(held) >= min(len(kept), window)


def test_reserving_room_keeps_what_the_cache_holds():
    window = 8
    cache, plain = RotatingKVCache(window), RotatingKVCache(window)
    for q in range(13):
        _visible(cache, [q])
        _visible(plain, [q])
    cache.reserve(3)
    for q in range(13, 20):
        assert _visible(cache, [q]) == _visible(plain, [q]) == [list(range(q - window + 1, q + 1))]
    assert np.array(cache.state[0])[0, 0, :, 0].tolist() == list(range(20 - 11, 20))


def test_an_image_block_written_into_a_ring_is_refused(pair):
    """The image overlay of a sliding mask needs the new keys last; a short call into a cache with a drafter's room
    would put them in ring slots, so it is refused rather than masked wrong."""
    from mlx_gemma4.cache import attention_masks

    model, drafter, _, _ = pair("e2b", True)
    cache = model.make_cache()
    speculative.DrafterKV(model, drafter, cache, 3)
    model(mx.array([PROMPT]), cache)
    with pytest.raises(ValueError, match="image block in a call of only 3 tokens"):
        attention_masks(model.config.text_config, 3, cache, mx.array([[0, 0, -1]]))
    attention_masks(model.config.text_config, 30, cache, mx.array([[0] * 30]))  # a longer call rebuilds: fine


def test_drafter_errors_are_one_line(pair, tiny_checkpoint, tiny_drafter):
    model, drafter, target_dir, drafter_dir = pair("e2b", True)
    other, _ = load(tiny_checkpoint("31b", with_towers=False))
    with pytest.raises(CheckpointError, match="pass the drafter of this model"):
        load_drafter(drafter_dir, other)
    with pytest.raises(CheckpointError, match="MTP drafter"):
        load(drafter_dir)
    with pytest.raises(CheckpointError, match="not an MTP drafter"):
        load_drafter(target_dir, model)
    with pytest.raises(ValueError, match="draft_tokens must be at least 1"):
        next(speculative.speculative_tokens(model, drafter, mx.array(PROMPT), draft_tokens=0))
    processor = load(target_dir)[1]
    with pytest.raises(ValueError, match="cannot be combined with a draft model"):
        next(stream_generate(model, processor, "Hi", draft_model=drafter,
                             logits_processors=make_logits_processors(repetition_penalty=1.2)))


def test_cli_with_a_draft_model(pair, capsys):
    _, _, target_dir, drafter_dir = pair("e2b", True)
    args = ["--model", str(target_dir), "--prompt", "Hello", "--temp", "0", "--max-tokens", "12"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main(args + ["--draft-model", str(drafter_dir), "--draft-tokens", "2"]) == 0
    drafted, note = capsys.readouterr()
    assert drafted.split("=" * 10)[0] == plain.split("=" * 10)[0]
    assert "Drafts accepted:" in drafted
    assert "on MLX's CPU backend a drafter makes decoding slower" in note  # this machine runs the CPU backend
    assert cli_main(args + ["--draft-tokens", "2"]) == 2
    assert "--draft-tokens needs --draft-model" in capsys.readouterr().err
