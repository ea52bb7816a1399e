"""The whole Gemma 4 model as a checkpoint stores it, and its weight-name rules."""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .text import LanguageModel

# Top-level modules of the encoders; loaded once their code is present.
TOWER_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
# Parameter names of the text model itself (a bare `gemma4_text` checkpoint
# stores them under `model.` without the `language_model.` level).
_TEXT_ROOTS = ("embed_tokens", "layers.", "norm.", "embed_tokens_per_layer", "per_layer_")


class Model(nn.Module):
    """Gemma 4: `model(input_ids, cache=None, **multimodal_inputs)` returns
    soft-capped logits `[batch, seq, vocab]`. Feeding a prompt in chunks through
    one cache gives the same logits as a single call."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text_config)

    def __call__(self, input_ids: mx.array, cache: Optional[List] = None, **multimodal_inputs) -> mx.array:
        given = sorted(k for k, v in multimodal_inputs.items() if v is not None)
        if given:
            raise ValueError(
                f"this model was loaded without encoders for {', '.join(given)}; "
                "pass text input_ids only"
            )
        return self.language_model(self.text_ids(input_ids), cache)

    def text_ids(self, input_ids: mx.array) -> mx.array:
        """`input_ids` with multimodal placeholders swapped for the pad id: the
        text embedding and PLE tables see pad there, as in transformers (the
        encoders' outputs then overwrite those positions)."""
        placeholders = [
            t for t in (self.config.image_token_id, self.config.video_token_id, self.config.audio_token_id)
            if t is not None
        ]
        if not placeholders:
            return input_ids
        is_placeholder = (input_ids[..., None] == mx.array(placeholders)).any(axis=-1)
        return mx.where(is_placeholder, self.config.text_config.pad_token_id, input_ids)

    def make_cache(self) -> List:
        """Fresh KV caches for one sequence: rotating for sliding layers, growing for global ones."""
        return self.language_model.make_cache()

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map HF (`model.language_model.…`), bare-text and MLX-converted key names
        onto this model's names. Idempotent: converted weights pass unchanged."""
        text = self.config.text_config
        kv_shared = re.compile(
            rf"language_model\.model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\."
        )
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            key = key[len("model."):] if key.startswith("model.") else key
            if key.startswith(_TEXT_ROOTS):
                key = "language_model.model." + key
            elif key.startswith("language_model.") and not key.startswith(
                ("language_model.model.", "language_model.lm_head.")
            ):
                key = "language_model.model." + key[len("language_model."):]
            elif key.startswith("lm_head."):
                key = "language_model." + key
            if key.startswith(TOWER_PREFIXES):
                if key.split(".", 1)[0] in self:
                    out[key] = value
                continue
            if key.startswith("language_model.lm_head.") and text.tie_word_embeddings:
                continue
            match = kv_shared.match(key)
            if match and int(match.group(1)) >= text.first_kv_shared_layer:
                continue
            if key.endswith("experts.gate_up_proj"):
                gate, up = mx.split(value, 2, axis=-2)
                base = key[: -len("gate_up_proj")] + "switch_glu."
                out[base + "gate_proj.weight"] = gate
                out[base + "up_proj.weight"] = up
                continue
            if key.endswith("experts.down_proj"):
                key += ".weight"
                key = key.replace("experts.down_proj", "experts.switch_glu.down_proj")
            out[key] = value
        return out
