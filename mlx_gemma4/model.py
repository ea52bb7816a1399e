"""The whole Gemma 4 model as a checkpoint stores it, and its weight-name rules."""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import vision
from .audio import AudioConfig, AudioEmbedder, AudioEncoder, valid_rows
from .cache import DEFAULT_QUANTIZED_KV_START, vision_block_ids
from .config import ModelConfig
from .encoder_cache import EncoderOutputCache
from .text import LanguageModel
from .vision import VisionConfig, VisionEmbedder, VisionTower

# Top-level modules of the encoders; loaded once their code is present.
TOWER_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
# Parameter names of the text model itself (a bare `gemma4_text` checkpoint
# stores them under `model.` without the `language_model.` level).
_TEXT_ROOTS = ("embed_tokens", "layers.", "norm.", "embed_tokens_per_layer", "per_layer_")


class Model(nn.Module):
    """Gemma 4: `model(input_ids, cache=None, **multimodal_inputs)` returns
    soft-capped logits `[batch, seq, vocab]`. Feeding a prompt in chunks through
    one cache gives the same logits as a single call (an image block must lie
    within one call: its tokens attend to each other both ways)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text_config)
        if config.vision_config is not None:
            tower = VisionConfig.from_dict(config.vision_config)
            self.vision_tower = VisionTower(tower)
            self.embed_vision = VisionEmbedder(tower.hidden_size, config.text_config.hidden_size, tower.rms_norm_eps)
        if config.audio_config is not None:
            audio = AudioConfig.from_dict(config.audio_config)
            self.audio_tower = AudioEncoder(audio)
            self.embed_audio = AudioEmbedder(audio, config.text_config.hidden_size)
        # Encoded images/frames by content, so a chat's earlier images are not re-encoded every turn.
        self.encoder_outputs = EncoderOutputCache()

    def __call__(
        self,
        input_ids: mx.array,
        cache: Optional[List] = None,
        *,
        input_embeddings: Optional[mx.array] = None,
        mm_token_type_ids: Optional[mx.array] = None,
        return_hidden: bool = False,
        **media: Optional[mx.array],
    ):
        """Logits for `input_ids` `[B, T]`, with the processor's image, video and
        audio outputs (`media`, see `embed`) merged in at their placeholder
        tokens, or with `input_embeddings` (`embed`'s output for these tokens)
        instead. `mm_token_type_ids` (1 image, 2 video) marks the bidirectional
        blocks; when omitted they are read off the placeholder ids. With
        `return_hidden`, `(logits, final normed hidden states)` (what an MTP drafter reads)."""
        blocks = self.vision_blocks(input_ids, mm_token_type_ids)
        media = {k: v for k, v in media.items() if v is not None}
        if media:
            if input_embeddings is not None:
                raise ValueError("give either input_embeddings or the media arrays they were made from, not both")
            input_embeddings = self.embed(input_ids, **media)
        return self.language_model(self.text_ids(input_ids), cache, input_embeddings, blocks, return_hidden)

    def embed(
        self,
        input_ids: mx.array,
        *,
        pixel_values: Optional[mx.array] = None,
        image_position_ids: Optional[mx.array] = None,
        pixel_values_videos: Optional[mx.array] = None,
        video_position_ids: Optional[mx.array] = None,
        input_features: Optional[mx.array] = None,
        input_features_mask: Optional[mx.array] = None,
        **other_inputs,
    ) -> mx.array:
        """The decoder's input embeddings `[B, T, hidden]` for `input_ids`: token
        embeddings with the encoded images, video frames and audio clips put in
        at their placeholders. A long prompt is embedded once and then fed in
        pieces (see `prefill.feed`)."""
        given = sorted(k for k, v in other_inputs.items() if v is not None)
        if given:
            raise ValueError(f"unsupported model input(s) {', '.join(given)}")
        embeddings = self.language_model.model.embed(self.text_ids(input_ids))
        media = (
            ("image", pixel_values, image_position_ids, self.config.image_token_id),
            ("video", pixel_values_videos, video_position_ids, self.config.video_token_id),
        )
        for kind, pixels, positions, token_id in media:
            if pixels is None:
                continue
            if positions is None:
                raise ValueError(f"{kind} pixel values need their position ids ({kind}_position_ids)")
            features = self.encode_vision(pixels, positions, kind)
            embeddings = merge_features(embeddings, input_ids, token_id, features, kind)
        if input_features is not None:
            features = self.encode_audio(input_features, input_features_mask)
            embeddings = merge_features(embeddings, input_ids, self.config.audio_token_id, features, "audio")
        return embeddings

    def encode_vision(self, pixel_values: mx.array, position_ids: mx.array, kind: str = "image") -> mx.array:
        """Soft-token embeddings `[total_tokens, text_hidden]` of processed
        images or video frames, in order. Each distinct image is encoded once
        and remembered in `encoder_outputs` (clear it after changing weights);
        the tower takes them in groups of at most `vision.PATCHES_PER_CALL` patches."""
        if "vision_tower" not in self:
            raise ValueError(
                f"this model has no vision encoder (text-only checkpoint or loaded with text_only=True); "
                f"it cannot take {kind} input"
            )
        if isinstance(pixel_values, mx.array):
            pixel_values = pixel_values.astype(mx.float32)  # numpy has no bfloat16
        pixels, positions = np.asarray(pixel_values), np.asarray(position_ids)
        tower = self.vision_tower.config
        width, block = 3 * tower.patch_size**2, tower.pooling_kernel_size**2
        if pixels.ndim != 3 or pixels.shape[2] != width or pixels.shape[1] % block or \
                positions.shape != (*pixels.shape[:2], 2):
            raise ValueError(
                f"{kind} pixel values must be [n, patches, {width}] (patches a multiple of {block}) with position "
                f"ids [n, patches, 2], got {pixels.shape} and {positions.shape}; use this checkpoint's processor"
            )
        keys = [EncoderOutputCache.key(kind, p, q) for p, q in zip(pixels, positions)]
        missing = [i for i, key in enumerate(keys) if self.encoder_outputs.get(key) is None]
        per_call = max(1, vision.PATCHES_PER_CALL // pixels.shape[1])
        for group in (missing[a:a + per_call] for a in range(0, len(missing), per_call)):
            encoded = self.vision_tower(mx.array(pixels[group]), mx.array(positions[group]))
            for i, features in zip(group, encoded):
                projected = self.embed_vision(features)
                mx.eval(projected)
                self.encoder_outputs.put(keys[i], projected)
        return mx.concatenate([self.encoder_outputs.get(key) for key in keys], axis=0)

    def encode_audio(self, input_features: mx.array, input_features_mask: Optional[mx.array] = None) -> mx.array:
        """Soft-token embeddings `[total_tokens, text_hidden]` of processed audio clips
        (`[n, frames, mels]` log-mel features, mask True on real frames; all real when
        omitted), in order, padding dropped; each distinct clip is encoded once."""
        if "audio_tower" not in self:
            raise ValueError(
                "this model has no audio encoder (only Gemma 4 E2B and E4B take audio, and not when loaded "
                "with text_only=True); it cannot take audio input"
            )
        features = np.asarray(input_features, dtype=np.float32)
        mask = np.ones(features.shape[:2], dtype=bool) if input_features_mask is None else np.asarray(
            input_features_mask).astype(bool)
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(
                f"audio features must be [n, frames, mels] with a [n, frames] mask, got {features.shape} "
                f"and {mask.shape}"
            )
        # Keyed by the real frames only, so a clip padded differently in another batch is still a hit.
        keys = [EncoderOutputCache.key("audio", f[m]) for f, m in zip(features, mask)]
        missing = [i for i, key in enumerate(keys) if self.encoder_outputs.get(key) is None]
        if missing:
            states, state_mask = self.audio_tower(mx.array(features[missing]), mx.array(mask[missing]))
            projected = self.embed_audio(states)
            for row, i in enumerate(missing):
                tokens = valid_rows(projected[row : row + 1], state_mask[row : row + 1])
                mx.eval(tokens)
                self.encoder_outputs.put(keys[i], tokens)
        return mx.concatenate([self.encoder_outputs.get(key) for key in keys], axis=0)

    def vision_blocks(self, input_ids: mx.array, token_types: Optional[mx.array]) -> Optional[mx.array]:
        """Block ids (`[B, T]`, -1 outside blocks) for the bidirectional image
        overlay, when the checkpoint uses it and `input_ids` hold an image or video."""
        # One token is a generated one: nothing to overlay, and no host sync in the decode loop.
        if self.config.text_config.use_bidirectional_attention != "vision" or input_ids.shape[1] == 1:
            return None
        if token_types is None:
            token_types = mx.zeros_like(input_ids)
            for token_id, kind in ((self.config.image_token_id, 1), (self.config.video_token_id, 2)):
                if token_id is not None:
                    token_types = mx.where(input_ids == token_id, kind, token_types)
        is_vision = (token_types == 1) | (token_types == 2)
        # A block always sits between begin- and end-of-image text tokens, so a call that starts or ends
        # inside one has split it, and its two halves could not see each other.
        any_vision, split = mx.stack([is_vision.any(), (is_vision[:, 0] | is_vision[:, -1]).any()]).tolist()
        if split:
            raise ValueError(
                "an image or video block is split across model calls; its tokens attend to each other both "
                "ways, so pass each block (begin- to end-of-image) within one call"
            )
        return vision_block_ids(token_types) if any_vision else None

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

    def make_cache(self, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                   kv_group_size: int = 64, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START) -> List:
        """Fresh KV caches for one sequence: rotating for sliding layers, growing
        for global ones (rotating too when `max_kv_size` is given; quantized to
        `kv_bits` in groups of `kv_group_size` when `kv_bits` is, once they hold
        more than `quantized_kv_start` tokens)."""
        return self.language_model.make_cache(max_kv_size, kv_bits, kv_group_size, quantized_kv_start)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map HF (`model.language_model.…`), bare-text and MLX-converted key names
        onto this model's names. Idempotent: converted weights pass unchanged."""
        text = self.config.text_config
        kv_shared = re.compile(
            r"language_model\.model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\."
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
                if key.startswith("audio_tower.") and "audio_tower" in self:
                    value = AudioEncoder.sanitize_conv_weight(key, value, self.audio_tower.config)
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


def merge_features(embeddings: mx.array, input_ids: mx.array, token_id: int, features: mx.array, kind: str) -> mx.array:
    """`embeddings` with the rows at `token_id` placeholders replaced, in order,
    by `features` (cast to the embedding dtype; no sqrt(hidden) scaling)."""
    flat_ids = np.asarray(input_ids).reshape(-1)
    where = np.flatnonzero(flat_ids == token_id)
    if len(where) != features.shape[0]:
        raise ValueError(
            f"the prompt has {len(where)} {kind} placeholder tokens but the {kind} inputs give "
            f"{features.shape[0]} soft tokens; build the prompt and the {kind} inputs with the same processor call"
        )
    shape = embeddings.shape
    flat = embeddings.reshape(-1, shape[-1])
    flat[mx.array(where)] = features.astype(flat.dtype)
    return flat.reshape(shape)
