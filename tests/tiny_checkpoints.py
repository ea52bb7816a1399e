"""Tiny random Gemma 4 checkpoints for parity tests against transformers.

Every checkpoint folder looks like a real Hugging Face Gemma 4 checkpoint: ``config.json``,
``generation_config.json``, safetensors shards with the real key names (written by
``Gemma4ForConditionalGeneration.save_pretrained``), ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json`` and ``chat_template.jinja``. Only the sizes are tiny, and every weight and
persistent buffer is moved away from its initial value so that a port which forgets a norm weight, a
``layer_scalar`` or a clipping bound produces different numbers.

The tokenizer is a small Gemma-shaped BPE (byte fallback, "▁" for spaces) trained on a built-in corpus.
Its control tokens deliberately use ids that differ from the real Gemma ids, so code that hard-codes
Gemma ids fails against it.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import Gemma4Config, Gemma4ForConditionalGeneration
from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

VARIANTS = ("e2b", "e4b", "26b", "31b")

CHAT_TEMPLATE = Path(__file__).parent / "fixtures" / "gemma4.jinja"

# Named special tokens under the names a real Gemma 4 ``tokenizer_config.json`` uses (plus ``<mask>``, which it
# also has), in id order: 0-4, 5-22, then <|video|> = 23. These are NOT the real Gemma ids.
BASE_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
                       "mask_token": "<mask>"}
MODEL_SPECIAL_TOKENS = {
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
    "think_token": "<|think|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "image_token": "<|image|>",
    "audio_token": "<|audio|>",
}
# Real Gemma 4 lists the video placeholder only under ``extra_special_tokens``.
EXTRA_SPECIAL_TOKENS = ("<|video|>",)
SPECIAL_TOKENS = (*BASE_SPECIAL_TOKENS.values(), *MODEL_SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS)

BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
TRAINED_VOCAB_SIZE = 320

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello to the world.
Once upon a time there was a little robot who lived in a quiet town near the sea. Every morning the robot
walked to the market, bought fresh bread and apples, and said good morning to everyone it met. The people of
the town liked the robot because it was kind, it was helpful, and it always told the truth.
One day a storm came from the north. The wind was strong and the rain fell for three days and three nights.
The robot helped the fishermen pull their boats onto the sand, carried water for the old baker, and read
stories to the children who were afraid of the thunder. When the sun came back, the whole town had a party.
What is the weather like today? It is sunny and warm, with a light breeze from the west.
How many apples are in the basket? There are 12 apples, 7 pears and 3 oranges: 22 pieces of fruit in total.
Please write a short poem about the moon. The moon is bright, the night is long, the stars are singing a
quiet song. Can you explain how a computer works? A computer reads instructions, stores numbers in memory,
and performs simple operations very quickly, one after another, billions of times every second.
The model thinks step by step before it answers. First it reads the question, then it makes a plan, then it
checks the plan, and finally it writes the answer. If a tool is useful, the model calls the tool and waits
for the response. The weather tool returns the temperature, the humidity and the wind speed for a city.
Paris, London, Tokyo, Berlin and New York are large cities. Rome is an old city with many churches.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 99 100 256 1000 2024 2025.
Punctuation: commas, periods. Questions? Answers! Quotes "like this" and 'like that'; colons: and dashes -
parentheses (such as these), slashes / and plus + minus - equals = percent % and the end.
User: hello there. Model: hello, how can I help you today? User: tell me a joke. Model: why did the robot
cross the road? Because it was programmed to do so. User: thank you, that was funny. Model: you are welcome.
"""


def _train_text_model() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains the BPE merges on ``CORPUS`` and returns the full vocabulary (specials, bytes, pieces) and merges."""
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Pieces never cross a word start ("▁"), a newline or a digit, as in SentencePiece-trained Gemma vocabularies.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB_SIZE, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]

    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces))}
    return vocab, [tuple(merge) for merge in trained["merges"]]


@functools.cache
def tokenizer() -> Tokenizer:
    """The tiny Gemma-shaped tokenizer (deterministic; built once per process)."""
    vocab, merges = _train_text_model()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Same pipeline as transformers' GemmaTokenizer / GemmaConverter, so loading it as a GemmaTokenizer
    # (which rebuilds the pipeline from vocab + merges) gives identical results.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = BASE_SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def token_id(token: str) -> int:
    """Id of ``token`` in the tiny tokenizer."""
    tid = tokenizer().token_to_id(token)
    if tid is None:
        raise KeyError(token)
    return tid


def build_tokenizer(out_dir: str | Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer().save(str(out_dir / "tokenizer.json"))
    config = {
        **BASE_SPECIAL_TOKENS,
        **MODEL_SPECIAL_TOKENS,
        "backend": "tokenizers",
        "extra_special_tokens": list(EXTRA_SPECIAL_TOKENS),
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    special_map = {
        name: {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, token in BASE_SPECIAL_TOKENS.items()
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    shutil.copyfile(CHAT_TEMPLATE, out_dir / "chat_template.jinja")


def _layer_types(num_layers: int, period: int) -> list[str]:
    """Gemma 4 attention pattern: every ``period``-th layer and the last layer are full attention."""
    return [
        "full_attention" if (i + 1) % period == 0 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]


def text_config(variant: str, sliding_window: int = 16) -> dict[str, Any]:
    """Tiny ``Gemma4TextConfig`` kwargs shaped like the real ``variant`` (one of ``VARIANTS``)."""
    vocab_size = tokenizer().get_vocab_size()
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "head_dim": 16,
        "global_head_dim": 32,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": sliding_window,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "pad_token_id": token_id(BASE_SPECIAL_TOKENS["pad_token"]),
        "bos_token_id": token_id(BASE_SPECIAL_TOKENS["bos_token"]),
        "eos_token_id": token_id(BASE_SPECIAL_TOKENS["eos_token"]),
    }
    if variant in ("e2b", "e4b"):
        num_layers, period = (10, 5) if variant == "e2b" else (12, 6)
        return {
            **common,
            "num_hidden_layers": num_layers,
            "layer_types": _layer_types(num_layers, period),
            "intermediate_size": 128,
            "num_key_value_heads": 1 if variant == "e2b" else 2,
            "num_global_key_value_heads": None,
            "attention_k_eq_v": False,
            "num_kv_shared_layers": 4,
            "use_double_wide_mlp": variant == "e2b",
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": vocab_size,
            "enable_moe_block": False,
            "max_position_embeddings": 131_072,
            "use_bidirectional_attention": None,
        }
    if variant in ("26b", "31b"):
        moe = variant == "26b"
        return {
            **common,
            "num_hidden_layers": 8,
            "layer_types": _layer_types(8, 6),
            "intermediate_size": 48 if moe else 128,
            "num_key_value_heads": 2,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "num_kv_shared_layers": 0,
            "use_double_wide_mlp": False,
            "hidden_size_per_layer_input": 0,
            "enable_moe_block": moe,
            "num_experts": 8 if moe else None,
            "top_k_experts": 2 if moe else None,
            "moe_intermediate_size": 32 if moe else None,
            "max_position_embeddings": 262_144,
            "use_bidirectional_attention": "vision",
        }
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def vision_config(variant: str) -> dict[str, Any]:
    """Tiny ``Gemma4VisionConfig`` kwargs (clipped linears for E2B/E4B, standardized output for 26B/31B)."""
    small = variant in ("e2b", "e4b")
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "patch_size": 4,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
        "use_clipped_linears": small,
        "standardize": not small,
    }


def processor_config(variant: str) -> dict[str, Any]:
    """``processor_config.json``: the real E2B/E4B image and video processor settings with this tiny tower's
    patch and pooling sizes, at the smallest budget (70 soft tokens)."""
    vision = vision_config(variant)
    common = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "resample": 3,
        "patch_size": vision["patch_size"],
        "max_soft_tokens": 70,
        "pooling_kernel_size": vision["pooling_kernel_size"],
    }
    return {
        "image_seq_length": 70,
        "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True,
                            "do_resize": True, "do_normalize": False, **common},
        "video_processor": {"video_processor_type": "Gemma4VideoProcessor", "do_normalize": True,
                            "num_frames": 32, "do_sample_frames": True, **common},
    }


def audio_config() -> dict[str, Any]:
    """Tiny ``Gemma4AudioConfig`` kwargs (E2B/E4B only).

    ``subsampling_conv_channels[0]`` stays 128: transformers sizes the input projection as
    ``(channels[0] // 4) * channels[1]``, which only matches 128-bin mel features when channels[0] == 128.
    """
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "subsampling_conv_channels": [128, 8],
        "output_proj_dims": 32,
        "conv_kernel_size": 5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "use_clipped_linears": True,
    }


def model_config(variant: str, *, sliding_window: int = 16, with_towers: bool = True) -> Gemma4Config:
    """Top-level ``gemma4`` config; multimodal token ids come from the tiny tokenizer."""
    has_audio = with_towers and variant in ("e2b", "e4b")
    return Gemma4Config(
        text_config=text_config(variant, sliding_window),
        vision_config=vision_config(variant) if with_towers else None,
        audio_config=audio_config() if has_audio else None,
        boi_token_id=token_id(MODEL_SPECIAL_TOKENS["boi_token"]),
        eoi_token_id=token_id(MODEL_SPECIAL_TOKENS["eoi_token"]),
        image_token_id=token_id(MODEL_SPECIAL_TOKENS["image_token"]),
        video_token_id=token_id(EXTRA_SPECIAL_TOKENS[0]),
        boa_token_id=token_id(MODEL_SPECIAL_TOKENS["boa_token"]),
        eoa_token_index=token_id(MODEL_SPECIAL_TOKENS["eoa_token"]),
        eoa_token_id=token_id(MODEL_SPECIAL_TOKENS["eoa_token"]),
        audio_token_id=token_id(MODEL_SPECIAL_TOKENS["audio_token"]),
        pad_token_id=token_id(BASE_SPECIAL_TOKENS["pad_token"]),
        bos_token_id=token_id(BASE_SPECIAL_TOKENS["bos_token"]),
        eos_token_id=[token_id(BASE_SPECIAL_TOKENS["eos_token"]), token_id(MODEL_SPECIAL_TOKENS["eot_token"])],
        tie_word_embeddings=True,
        initializer_range=0.02,
    )


def _redrawn(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A random replacement for ``tensor``, scaled so that activations stay O(1) and logits are not saturated."""
    parent, module, leaf = ["", "", *name.split(".")][-3:]  # "" pads names with fewer than three parts
    shape = tensor.shape
    if leaf in ("layer_scalar", "scale", "per_expert_scale", "std_scale") or ("norm" in module and leaf == "weight"):
        return 0.5 + torch.rand(shape)  # multiplicative: in [0.5, 1.5), positive, never exactly 1
    if leaf in ("std_bias", "per_dim_scale", "position_embedding_table"):
        return 0.5 * torch.randn(shape)
    if leaf == "bias":
        return 0.1 * torch.randn(shape)
    if module in ("embed_tokens", "embed_tokens_per_layer"):
        return 0.5 * torch.randn(shape)  # tied LM head: logit std ~ 0.5 * sqrt(hidden_size) = 4
    if parent == "router" and module == "proj":
        return 2.0 / shape[-1] ** 0.5 * torch.randn(shape)  # well-separated expert scores: top-k is not a near-tie
    if tensor.dim() >= 2:
        fan_in = shape[1:].numel() if "conv" in module else shape[-1]
        return fan_in**-0.5 * torch.randn(shape)
    raise ValueError(f"no perturbation rule for {name} {tuple(shape)}")


_CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    """Redraws every saved float parameter and buffer except the clipping bounds (see ``_calibrate_clipping``);
    integer buffers (a drafter's token ordering) are left to the caller."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or name.rsplit(".", 1)[-1] in _CLIP_BUFFERS or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        tensor.copy_(_redrawn(name, tensor))


@torch.no_grad()
def _calibrate_clipping(model: Gemma4ForConditionalGeneration) -> None:
    """Sets every ClippableLinear bound to the 2nd / 98th percentile of what it sees on a random input.

    Run with the bounds still at +-inf, so each bound is finite and clips a few percent of typical activations.
    """
    clipped = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped_linears]
    if not clipped:
        return
    bounds: dict[Gemma4ClippableLinear, tuple[torch.Tensor, ...]] = {}

    def record(module: Gemma4ClippableLinear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        q = torch.tensor([0.02, 0.98])
        bounds[module] = (*torch.quantile(args[0].float().flatten(), q), *torch.quantile(output.float().flatten(), q))

    hooks = [m.register_forward_hook(record) for m in clipped]
    try:
        vision = model.model.vision_tower
        if vision is not None:
            patch, side = vision.config.patch_size, 4  # a 16x16 image: 4x4 patches
            pixels = torch.rand(1, side * side, 3 * patch * patch)
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]
            vision(pixel_values=pixels, pixel_position_ids=positions)
        audio = model.model.audio_tower
        if audio is not None:
            features = torch.randn(1, 48, 128)
            audio(input_features=features, attention_mask=torch.ones(1, 48, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    for module in clipped:
        for buffer_name, value in zip(_CLIP_BUFFERS, bounds[module]):
            getattr(module, buffer_name).fill_(value)


def _write_released_config_form(path: Path, variant: str, sliding_window: int) -> None:
    """Rewrites a transformers-saved config.json into the form of Google's released configs.

    transformers 5.x serialises the full-attention overrides as ``text_config.per_layer_config`` and the vision
    RoPE type as "axial"; the released checkpoints instead carry ``global_head_dim`` /
    ``num_global_key_value_heads`` and ``"rope_type": "default"``. Both forms load to the same model.
    """
    config = json.loads(path.read_text())
    text = config["text_config"]
    del text["per_layer_config"]
    tiny = text_config(variant, sliding_window)
    text["global_head_dim"] = tiny["global_head_dim"]
    text["num_global_key_value_heads"] = tiny["num_global_key_value_heads"]
    config["text_config"] = dict(sorted(text.items()))
    if config.get("vision_config"):
        config["vision_config"]["rope_parameters"]["rope_type"] = "default"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_checkpoint(
    out_dir: str | Path,
    variant: str,
    *,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    seed: int = 0,
    sliding_window: int = 16,
    with_towers: bool = True,
) -> Path:
    """Writes a tiny random ``variant`` checkpoint (weights, configs, tokenizer, chat template) to ``out_dir``.

    ``with_towers=False`` gives a text-only ``Gemma4ForConditionalGeneration`` checkpoint (``vision_config`` and
    ``audio_config`` null, no tower weights), the layout of a text-only conversion. ``dtype`` is "float32" or
    "bfloat16"; ``max_shard_size`` (e.g. "200KB") forces several safetensors shards plus an index.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(model_config(variant, sliding_window=sliding_window, with_towers=with_towers))
    _perturb(model)
    _calibrate_clipping(model)

    model.to(getattr(torch, dtype))
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    _write_released_config_form(out_dir / "config.json", variant, sliding_window)
    build_tokenizer(out_dir)
    if with_towers:
        (out_dir / "processor_config.json").write_text(json.dumps(processor_config(variant), indent=2) + "\n")
    generation_config = {
        "bos_token_id": token_id(BASE_SPECIAL_TOKENS["bos_token"]),
        "do_sample": True,
        "eos_token_id": [token_id(t) for t in ("<eos>", "<turn|>", "<|tool_response>")],
        "pad_token_id": token_id(BASE_SPECIAL_TOKENS["pad_token"]),
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out_dir


def drafter_config(variant: str, *, ordered: bool, sliding_window: int = 16) -> dict[str, Any]:
    """Tiny ``Gemma4AssistantConfig`` kwargs for the target ``variant``: 4 KV-shared layers (3 sliding, 1 full)
    whose K/V geometry per attention type is the target's, as a real "-assistant" drafter's is."""
    target = text_config(variant, sliding_window)
    text = {
        **{k: target[k] for k in ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads",
                                  "num_global_key_value_heads", "attention_k_eq_v", "rope_parameters",
                                  "sliding_window", "hidden_activation", "rms_norm_eps", "pad_token_id",
                                  "bos_token_id", "eos_token_id", "max_position_embeddings")},
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "num_kv_shared_layers": 4,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
    }
    return {
        "text_config": text,
        "backbone_hidden_size": target["hidden_size"],
        "use_ordered_embeddings": ordered,
        # The tiny vocabulary (600) in 8 clusters of 75 tokens; 3 of them scored.
        "num_centroids": 8,
        "centroid_intermediate_top_k": 3,
    }


def build_drafter(out_dir: str | Path, variant: str, *, ordered: bool = True, seed: int = 0,
                  sliding_window: int = 16) -> Path:
    """Writes a tiny random MTP drafter (``Gemma4AssistantForCausalLM``) for the target ``variant`` to ``out_dir``;
    ``ordered`` gives it the clustered LM head of the E-series drafters, else the dense tied head."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(
        Gemma4AssistantConfig(**drafter_config(variant, ordered=ordered, sliding_window=sliding_window)))
    _perturb(model)
    if ordered:
        with torch.no_grad():  # a permutation of the vocabulary
            model.masked_embedding.token_ordering.copy_(torch.randperm(model.config.text_config.vocab_size))
    model.save_pretrained(out_dir)
    return out_dir
