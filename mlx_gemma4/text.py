"""The Gemma 4 text decoder: one code path for every variant."""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import ple
from .attention import Attention
from .cache import DEFAULT_QUANTIZED_KV_START, attention_masks, cache_offset, make_cache
from .config import TextConfig
from .kernels import add_and_widen, add_scale, softcap, weigh_normed
from .mlp import MLP
from .moe import Experts, Router
from .quantized import QuantizedEmbedding


class DecoderLayer(nn.Module):
    """Sandwich-normed attention and feed-forward (dense MLP, plus the experts in
    parallel on MoE models), the PLE gate, then a learned scalar on the residual."""

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(hidden, config.layer_intermediate_size(layer))
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.layer_scalar = mx.ones((1,))
        if config.enable_moe_block:
            self.router = Router(config)
            self.experts = Experts(config)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
            # Set at load time by `fusion.fuse`; None (trainable models): built per call.
            self._feed_forward_norm_weights: Optional[mx.array] = None
        self.has_ple = bool(config.hidden_size_per_layer_input)
        if self.has_ple:
            ple.add_layer_weights(self, config)

    def __call__(self, h, mask, offset, cache=None, shared_kv=None, per_layer_input=None):
        a, kv = self.self_attn(self.input_layernorm(h), mask, offset, cache, shared_kv)
        if "router" in self:
            h, h32 = add_and_widen(h, self.post_attention_layernorm(a))
            dense_input, experts_input, normed = self.feed_forward_inputs(h32)
            dense = self.mlp(dense_input)
            e = self.experts(experts_input, *self.router(normed), after=dense)
            f = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(e)
        else:
            h = h + self.post_attention_layernorm(a)
            f = self.mlp(self.pre_feedforward_layernorm(h))
        f = self.post_feedforward_layernorm(f)
        if self.has_ple:
            h = h + f
            f = ple.layer_input_term(self, h, per_layer_input)
        return add_scale(h, f, self.layer_scalar), kv

    def feed_forward_norm_weights(self) -> mx.array:
        """`[2, 1, 1, hidden]`: the weights of an MoE layer's two feed-forward
        input norms, the dense MLP's then the experts' (`fusion.fuse` stores it)."""
        if self._feed_forward_norm_weights is not None:
            return self._feed_forward_norm_weights
        weights = [self.pre_feedforward_layernorm.weight, self.pre_feedforward_layernorm_2.weight]
        return mx.stack(weights)[:, None, None]

    def feed_forward_inputs(self, h32: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        """An MoE layer's three RMS norms of the residual stream `h32` (float32):
        the dense MLP's and the experts' inputs, then the router's without its
        weight, in float32 (the router applies it). One weightless norm and one
        kernel for both weights, where the three norms took three kernels and the
        float32 cast a fourth; the outputs equal the norms' own, as the norm
        kernel also rounds to the output dtype before the weight."""
        normed = mx.fast.rms_norm(h32, None, self.pre_feedforward_layernorm.eps)
        # Views of the one output (an integer index would gather a copy).
        dense, experts = (x.squeeze(0) for x in mx.split(weigh_normed(normed, self.feed_forward_norm_weights()), 2))
        return dense, experts, normed


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (`language_model.model`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.hidden_size_per_layer_input:
            ple.add_model_weights(self, config)
        # The activations' dtype (set by the loader, see `precision`); None: the embedding's.
        self.compute_dtype = None

    def lookup(self, table: nn.Module, input_ids: mx.array) -> mx.array:
        """Rows of an embedding table in the compute dtype."""
        rows = table(input_ids)
        return rows if self.compute_dtype is None else rows.astype(self.compute_dtype)

    def embed(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings, `embed_tokens[ids] * sqrt(hidden_size)`."""
        scale = self.config.hidden_size**0.5
        # The scale is rounded to the embedding dtype first, as transformers does.
        if self.compute_dtype is not None and isinstance(self.embed_tokens, QuantizedEmbedding):
            return self.embed_tokens.scaled_rows(input_ids, mx.array(scale, dtype=self.compute_dtype))
        x = self.lookup(self.embed_tokens, input_ids)
        return x * mx.array(scale, dtype=x.dtype)

    def __call__(
        self,
        input_ids: mx.array,
        cache: Optional[List] = None,
        input_embeddings: Optional[mx.array] = None,
        vision_blocks: Optional[mx.array] = None,
    ) -> mx.array:
        """Final hidden states `[B, T, hidden]`.

        `input_embeddings` replaces the token embeddings (multimodal inputs
        merged in); `input_ids` still selects the PLE rows, with placeholders
        already swapped for the pad id. `vision_blocks` (`[B, T]`, -1 for text)
        makes each image block bidirectional on sliding layers.
        """
        config = self.config
        h = self.embed(input_ids) if input_embeddings is None else input_embeddings
        per_layer = ple.per_layer_inputs(self, config, input_ids, h) if "embed_tokens_per_layer" in self else None

        offset = cache_offset(cache)
        masks = attention_masks(config, h.shape[1], cache, vision_blocks)
        # Only the K/V that later layers read are kept: the others (views of a
        # layer's whole Q|K|V buffers) are freed as soon as their layer is done.
        read_later = {config.kv_source_layer(i) for i in range(config.first_kv_shared_layer, len(self.layers))}
        produced = {}
        for i, layer in enumerate(self.layers):
            source = config.kv_source_layer(i)
            h, kv = layer(
                h,
                masks[config.layer_types[i]],
                offset,
                cache=cache[i] if cache and source == i else None,
                shared_kv=produced[source] if source != i else None,
                per_layer_input=per_layer[:, :, i] if per_layer is not None else None,
            )
            if i in read_later:
                produced[i] = kv
        return self.norm(h)


class LanguageModel(nn.Module):
    """The text model with its tied LM head and final logit soft-capping."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, input_ids, cache=None, input_embeddings=None, vision_blocks=None, return_hidden=False):
        """Soft-capped logits; with `return_hidden`, `(logits, final normed hidden states)`."""
        h = self.model(input_ids, cache, input_embeddings, vision_blocks)
        if "lm_head" in self:
            logits = self.lm_head(h)
        else:
            logits = self.model.embed_tokens.as_linear(h)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = softcap(logits, mx.array(cap, dtype=logits.dtype))
        return (logits, h) if return_hidden else logits

    def make_cache(self, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                   kv_group_size: int = 64, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START) -> List:
        return make_cache(self.config, max_kv_size, kv_bits, kv_group_size, quantized_kv_start)
