"""The tiny checkpoints look like real Gemma 4 checkpoints and are far from their initialisation."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Gemma4ForConditionalGeneration
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

from tiny_checkpoints import SPECIAL_TOKENS, VARIANTS, text_config, token_id

SOFTCAP = 30.0
PREFIX = "model.language_model."


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


@pytest.mark.parametrize("variant", VARIANTS)
def test_reloads_in_transformers_without_missing_or_unexpected_keys(tiny_checkpoint, variant):
    _, info = Gemma4ForConditionalGeneration.from_pretrained(tiny_checkpoint(variant), output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_key_layout(tiny_checkpoint, variant):
    keys = set(saved_tensors(tiny_checkpoint(variant)))
    text = text_config(variant)
    n_layers, shared = text["num_hidden_layers"], text["num_kv_shared_layers"]
    assert "lm_head.weight" not in keys  # tied to embed_tokens
    for i, layer_type in enumerate(text["layer_types"]):
        layer = f"{PREFIX}layers.{i}."
        assert {layer + "self_attn.q_proj.weight", layer + "self_attn.o_proj.weight", layer + "layer_scalar"} <= keys
        owns_kv = i < n_layers - shared
        assert (layer + "self_attn.k_proj.weight" in keys) == owns_kv
        assert (layer + "self_attn.k_norm.weight" in keys) == owns_kv
        k_eq_v = text["attention_k_eq_v"] and layer_type == "full_attention"
        assert (layer + "self_attn.v_proj.weight" in keys) == (owns_kv and not k_eq_v)
        assert (layer + "per_layer_input_gate.weight" in keys) == (text["hidden_size_per_layer_input"] > 0)
        moe = {layer + "experts.gate_up_proj", layer + "experts.down_proj", layer + "router.proj.weight",
               layer + "router.scale", layer + "router.per_expert_scale"}
        assert (moe <= keys) == text["enable_moe_block"]
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert any(k.startswith("model.audio_tower.") for k in keys) == (variant in ("e2b", "e4b"))


def test_double_wide_mlp_only_in_e2b_kv_shared_layers(tiny_checkpoint):
    tensors = saved_tensors(tiny_checkpoint("e2b"))
    widths = [tensors[f"{PREFIX}layers.{i}.mlp.up_proj.weight"].shape[0] for i in range(10)]
    assert widths == [128] * 6 + [256] * 4


def test_config_is_in_released_form(tiny_checkpoint):
    config = json.loads((tiny_checkpoint("26b") / "config.json").read_text())
    text = config["text_config"]
    assert "per_layer_config" not in text
    assert (text["global_head_dim"], text["num_global_key_value_heads"]) == (32, 1)
    assert config["vision_config"]["rope_parameters"]["rope_type"] == "default"
    assert config["audio_config"] is None
    assert config["image_token_id"] == token_id("<|image|>")
    assert config["eos_token_id"] == [token_id("<eos>"), token_id("<turn|>")]
    generation = json.loads((tiny_checkpoint("26b") / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [token_id("<eos>"), token_id("<turn|>"), token_id("<|tool_response>")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_attention_layers_use_global_head_dim(tiny_checkpoint, hf_model, variant):
    model = hf_model(tiny_checkpoint(variant))
    text = text_config(variant)
    for layer, layer_type in zip(model.model.language_model.layers, text["layer_types"]):
        expected = text["global_head_dim"] if layer_type == "full_attention" else text["head_dim"]
        assert layer.self_attn.head_dim == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_tensor_is_perturbed(tiny_checkpoint, variant):
    for name, tensor in saved_tensors(tiny_checkpoint(variant)).items():
        assert torch.isfinite(tensor).all(), name
        if tensor.numel() > 1:
            assert tensor.std() > 0, f"{name} is constant"
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("layer_scalar", "scale", "per_expert_scale", "std_scale") or "norm" in name:
            assert (tensor != 1).all() and (tensor > 0).all(), name
        if leaf in ("input_min", "input_max", "output_min", "output_max"):
            assert tensor.abs() < 100, name


def test_clipping_bounds_clip_real_activations(tiny_checkpoint, hf_model):
    model = hf_model(tiny_checkpoint("e4b"))
    clipped_inputs = []

    def check(module, args):
        x = args[0]
        clipped_inputs.append(bool(((x < module.input_min) | (x > module.input_max)).any()))

    clippables = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear)]
    hooks = [m.register_forward_pre_hook(check) for m in clippables]
    try:
        gen = torch.Generator().manual_seed(3)
        ys, xs = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
        positions = torch.stack([xs.flatten(), ys.flatten()], -1)[None]
        with torch.no_grad():
            model.model.vision_tower(pixel_values=torch.rand(1, 36, 48, generator=gen), pixel_position_ids=positions)
            model.model.audio_tower(input_features=torch.randn(1, 64, 128, generator=gen),
                                    attention_mask=torch.ones(1, 64, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(clipped_inputs) == len(clippables)
    assert sum(clipped_inputs) > 0.8 * len(clipped_inputs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_are_finite_and_not_saturated(tiny_checkpoint, hf_model, variant):
    path = tiny_checkpoint(variant)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "Tell me a story about the robot, the storm and the fishermen of the town."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 40
    with torch.no_grad():
        logits = hf_model(path)(input_ids=ids[:, :40]).logits
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std() < 10.0
    assert (logits.abs() > 0.9 * SOFTCAP).float().mean() < 0.01


def test_text_only_checkpoint(tiny_checkpoint, hf_model):
    path = tiny_checkpoint("e2b", with_towers=False)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert config["vision_config"] is None and config["audio_config"] is None
    keys = saved_tensors(path)
    assert all(k.startswith(PREFIX) for k in keys)
    model = hf_model(path)
    assert model.model.vision_tower is None and model.model.audio_tower is None


def test_bfloat16_sharded_checkpoint(tiny_checkpoint):
    path = tiny_checkpoint("26b", dtype="bfloat16", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {t.dtype for t in saved_tensors(path).values()} == {torch.bfloat16}
    _, info = Gemma4ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info


def test_tokenizer_loads_in_transformers(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("31b"))
    assert 400 <= len(tokenizer) <= 800
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:4]] == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids("<turn|>") != 106  # not the real Gemma id
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    ids = tokenizer.encode("café 🤖", add_special_tokens=False)
    assert tokenizer.decode(ids) == "café 🤖"  # byte fallback
