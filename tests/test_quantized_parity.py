"""4-bit models against transformers: our quantized routes (dequantized prefill
blocks, the streamed MLP, packed decode products, expert gathers, the tied LM
head, all split over the CPU streams) compute what transformers computes with
the same weights, dequantized.

The checkpoints are bfloat16, as real ones are, so the scales are bfloat16 and a
route that rounded the unpacked weights to bfloat16 would show here.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma4 import quantized
from mlx_gemma4.loader import load_model, read_config, read_weights
from test_text_parity import greedy_mlx, mlx_logits, prompt_ids
from tiny_checkpoints import VARIANTS

WINDOW = 16
PROMPT_LEN = quantized.DEQUANTIZE_MIN_ROWS + 16  # long enough for the dequantized prefill
GROUP = 32


def hf_name(name: str) -> str:
    """An MLX text weight's transformers name (the stacked gate/up: see below)."""
    name = name.replace("language_model.model.", "model.language_model.", 1)
    return name.replace("experts.switch_glu.down_proj.weight", "experts.down_proj")


def dequantized_for_transformers(folder) -> dict:
    """Every quantized weight of a converted checkpoint, unpacked exactly in
    float32 and named as transformers names it."""
    weights, quantization = read_weights(folder), read_config(folder)["quantization"]
    out = {}
    for key in [k for k in weights if k.endswith(".scales")]:
        base = key.removesuffix(".scales")
        spec = quantization.get(base)
        spec = spec if isinstance(spec, dict) else quantization
        out[base + ".weight"] = mx.dequantize(
            weights[base + ".weight"], weights[key].astype(mx.float32), weights[base + ".biases"].astype(mx.float32),
            group_size=spec["group_size"], bits=spec["bits"])
    for gate in [k for k in out if k.endswith("switch_glu.gate_proj.weight")]:
        up = out.pop(gate.replace("gate_proj", "up_proj"))
        out[gate.replace("switch_glu.gate_proj.weight", "gate_up_proj")] = mx.concatenate([out.pop(gate), up], axis=-2)
    return {hf_name(k): torch.from_numpy(np.array(v)) for k, v in out.items()}


@pytest.fixture(scope="module", params=VARIANTS)
def quantized_pair(request, tiny_checkpoint, tmp_path_factory):
    from convert import convert
    from transformers import Gemma4ForConditionalGeneration

    source = tiny_checkpoint(request.param, dtype="bfloat16", with_towers=False, sliding_window=WINDOW)
    folder = tmp_path_factory.mktemp("q4-parity") / request.param
    convert(source, folder, quantize=True, q_bits=4, q_group_size=GROUP, report=False, progress=False,
            log=lambda *a: None)
    hf = Gemma4ForConditionalGeneration.from_pretrained(source, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    unpacked = dequantized_for_transformers(folder)
    # Only the quantized weights change (in place, so the tied LM head follows the embedding).
    assert unpacked and not hf.load_state_dict(unpacked, strict=False).unexpected_keys
    return load_model(folder), hf


def test_4bit_prefill_logits_match_transformers_on_the_dequantized_weights(quantized_pair):
    model, hf = quantized_pair
    ids = prompt_ids(hf.config.text_config.vocab_size, PROMPT_LEN)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    got = mlx_logits(model, ids)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)


def test_4bit_greedy_decode_matches_transformers_on_the_dequantized_weights(quantized_pair):
    model, hf = quantized_pair
    ids = prompt_ids(hf.config.text_config.vocab_size, PROMPT_LEN)
    steps = 12
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids).long(), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert greedy_mlx(model, ids, steps) == ref


def test_4bit_decode_step_logits_match_transformers_on_the_dequantized_weights(quantized_pair):
    """Each one-token step through the cache (on the CPU: the packed decode products and, on MoE models, the
    experts copied out a block of columns at a time) against transformers' logits at the same positions."""
    model, hf = quantized_pair
    steps = 6
    ids = prompt_ids(hf.config.text_config.vocab_size, PROMPT_LEN + steps)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits[:, PROMPT_LEN:].numpy()
    cache = model.make_cache()
    mx.eval(model(mx.array(ids[:, :PROMPT_LEN]), cache))
    got = np.concatenate([mlx_logits(model, ids[:, i:i + 1], cache) for i in range(PROMPT_LEN, PROMPT_LEN + steps)],
                         axis=1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
