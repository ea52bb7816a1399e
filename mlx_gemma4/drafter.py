"""The multi-token-prediction (MTP) drafters of Gemma 4 ("-assistant" checkpoints).

A drafter is a small decoder whose every layer attends over its target's keys
and values (those of the target's last K/V-owning layer of the same attention
type), so it has no cache and no prefill of its own. A draft step reads the
target's scaled embedding of the last token beside a hidden state (the
target's final-normed state at the position before, then the drafter's own
projected output) and proposes the token after it, always at the position of
that last token. `speculative` verifies the proposals with the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from . import precision
from .attention import KV
from .config import DRAFTER_MODEL_TYPE, TextConfig
from .fusion import fuse_layers
from .loader import (CheckpointError, evaluate_constants, evaluate_parameters, read_config, read_generation_config,
                     read_into, resolve)
from .text import DecoderLayer


@dataclass
class DrafterConfig:
    """A `gemma4_assistant` config.json."""

    text_config: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    quantization: Optional[dict] = None
    # generation_config.json (`num_assistant_tokens`: drafts per round).
    generation: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "DrafterConfig":
        if config.get("model_type") != DRAFTER_MODEL_TYPE:
            raise ValueError(f"config.json: model_type '{config.get('model_type')}' is not an MTP drafter "
                             f"({DRAFTER_MODEL_TYPE}); pass the target's '-assistant' checkpoint")
        if not isinstance(config.get("text_config"), dict) or "backbone_hidden_size" not in config:
            raise ValueError("config.json: a drafter needs text_config and backbone_hidden_size")
        text = dict(config["text_config"])
        # As transformers does: a drafter's layers all read the target's K/V.
        text["num_kv_shared_layers"] = text.get("num_kv_shared_layers") or text.get("num_hidden_layers")
        text_config = TextConfig.from_dict(text)
        if text_config.num_kv_shared_layers != text_config.num_hidden_layers:
            raise ValueError("text_config: every drafter layer must share K/V (num_kv_shared_layers = num_hidden_layers)")
        if text_config.hidden_size_per_layer_input or text_config.enable_moe_block or text_config.use_double_wide_mlp:
            raise ValueError("text_config: a drafter has no per-layer inputs, experts or double-wide MLP")
        drafter = cls(
            text_config=text_config,
            backbone_hidden_size=config["backbone_hidden_size"],
            **{k: config[k] for k in ("use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k",
                                      "quantization") if k in config},
        )
        if drafter.use_ordered_embeddings and (
            text_config.vocab_size % drafter.num_centroids
            or not 0 < drafter.centroid_intermediate_top_k <= drafter.num_centroids
        ):
            raise ValueError(f"config.json: {drafter.num_centroids} centroids (top {drafter.centroid_intermediate_top_k}) "
                             f"do not split the vocabulary of {text_config.vocab_size} evenly")
        return drafter

    def check_target(self, target: TextConfig) -> None:
        """Raise ValueError unless the drafter can read `target`'s K/V and hidden states."""
        text = self.text_config
        if self.backbone_hidden_size != target.hidden_size:
            raise ValueError(f"the drafter was made for a target of hidden size {self.backbone_hidden_size}, "
                             f"this model has {target.hidden_size}; pass the drafter of this model")
        if text.vocab_size != target.vocab_size:
            raise ValueError(f"the drafter's vocabulary ({text.vocab_size}) differs from the model's ({target.vocab_size})")
        for layer, kind in enumerate(text.layer_types):
            source = target.last_kv_owner(kind)
            if source is None:
                raise ValueError(f"the drafter reads {kind} K/V, which this model does not have")
            mine = (text.layer_kv_heads(layer), text.layer_head_dim(layer))
            theirs = (target.layer_kv_heads(source), target.layer_head_dim(source))
            if mine != theirs:
                raise ValueError(f"drafter layer {layer} attends over {mine[0]} K/V heads of width {mine[1]}, but the "
                                 f"model's {kind} layers have {theirs[0]} of width {theirs[1]}; pass the drafter of this model")


class MaskedEmbedder(nn.Module):
    """The clustered LM head of E-series drafters: the top `k` of the centroid
    scores pick `k` clusters of tokens, and only those tokens are scored."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        text = config.text_config
        self.top_k = config.centroid_intermediate_top_k
        self.centroids = nn.Linear(text.hidden_size, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((text.vocab_size,), dtype=mx.int32)

    def candidates(self, h: mx.array) -> mx.array:
        """Token ids `[..., top_k * tokens_per_cluster]` worth scoring for `h`."""
        scores = self.centroids(h)
        clusters = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        by_cluster = self.token_ordering.reshape(scores.shape[-1], -1)
        return by_cluster[clusters].reshape(*h.shape[:-1], -1)


class DrafterModel(nn.Module):
    """The drafter's decoder (`model.` in the checkpoint)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Drafter(nn.Module):
    """`Gemma4AssistantForCausalLM`: projections in and out of the target's
    width around a decoder that cross-attends to the target's K/V."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.model = DrafterModel(text)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)

    def __call__(self, embedding: mx.array, hidden: mx.array, shared_kv: Dict[str, KV],
                 position: int) -> Tuple[mx.array, mx.array]:
        """One draft step: the normed state `[B, 1, hidden]` to score tokens with,
        and the hidden state the next step reads (in the target's width).

        `embedding` is the target's scaled embedding of the last token, `hidden`
        the state before it, `shared_kv` the target's K/V by layer type (every
        key there is visible: the sliding type holds at most a window), and
        `position` that of the last token.
        """
        h = self.pre_projection(mx.concatenate([embedding, hidden], axis=-1))
        for layer, kind in zip(self.model.layers, self.config.text_config.layer_types):
            h, _ = layer(h, None, position, shared_kv=shared_kv[kind])
        h = self.model.norm(h)
        return h, self.post_projection(h)

    def candidate_logits(self, h: mx.array) -> Tuple[Optional[mx.array], mx.array]:
        """`(ids, logits)`: the whole vocabulary's logits with ids None (a dense
        head), or the logits of the clustered head's candidate ids only."""
        embed = self.model.embed_tokens
        if "masked_embedding" not in self:
            return None, embed.as_linear(h)
        ids = self.masked_embedding.candidates(h)
        rows = embed(ids).astype(h.dtype)
        return ids, (rows @ h[..., None])[..., 0]

    def greedy_token(self, h: mx.array) -> mx.array:
        """The most likely next token `[B, T]` (drafts are always greedy: the
        verifier accepts a draft only where it is the target's own choice)."""
        ids, logits = self.candidate_logits(h)
        best = mx.argmax(logits, axis=-1)
        return best if ids is None else mx.take_along_axis(ids, best[..., None], axis=-1)[..., 0]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """transformers' and MLX-converted names are the same; the tied head is dropped."""
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key or (key == "lm_head.weight" and self.config.text_config.tie_word_embeddings):
                continue
            out[key] = value.astype(mx.int32) if key == "masked_embedding.token_ordering" else value
        return out

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per round by default: the checkpoint's
        `num_assistant_tokens`, else 3 (mlx-vlm's default block of 4)."""
        return int(self.config.generation.get("num_assistant_tokens", 3))


def load_drafter(path_or_repo: Union[str, Path], target, *, revision: Optional[str] = None) -> Drafter:
    """Load the MTP drafter of `target` (a loaded `Model`) from a folder or Hub
    repo, computing in the target's dtype."""
    folder = resolve(path_or_repo, revision)
    try:
        config = DrafterConfig.from_dict(read_config(folder))
        config.check_target(target.config.text_config)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    config.generation = read_generation_config(folder)
    drafter = Drafter(config)
    weights = read_into(drafter, folder, config.quantization)
    compute = target.language_model.model.compute_dtype or mx.float32  # set by `load`
    # A clustered head only looks rows up (cast one by one): its table stays as stored.
    table = {"model.embed_tokens.weight"} if config.use_ordered_embeddings else set()
    cast = precision.cast_weights({k: v for k, v in weights.items() if k not in table}, compute,
                                  config.text_config.tie_word_embeddings)
    weights = {**cast, **{k: weights[k] for k in table if k in weights}}
    drafter.load_weights(list(weights.items()), strict=False)
    del weights
    fuse_layers(drafter.model.layers)
    drafter.eval()
    evaluate_constants(drafter)
    evaluate_parameters(drafter)
    return drafter
