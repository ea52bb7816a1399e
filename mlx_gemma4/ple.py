"""Per-layer embeddings (PLE) of E2B/E4B: a small extra input for every layer.

The weights keep the checkpoint's names and sit directly on the text model
(`embed_tokens_per_layer`, `per_layer_model_projection`, `per_layer_projection_norm`)
and on each decoder layer (`per_layer_input_gate`, `per_layer_projection`,
`post_per_layer_input_norm`), so this module adds them to those owners and holds
the math that uses them.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .kernels import geglu, mix


def add_model_weights(model: nn.Module, config: TextConfig) -> None:
    """Give the text model the packed PLE table and its context projection."""
    n_layers, width = config.num_hidden_layers, config.hidden_size_per_layer_input
    model.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, n_layers * width)
    model.per_layer_model_projection = nn.Linear(config.hidden_size, n_layers * width, bias=False)
    model.per_layer_projection_norm = nn.RMSNorm(width, eps=config.rms_norm_eps)


def per_layer_inputs(
    model: nn.Module, config: TextConfig, input_ids: mx.array, embeddings: mx.array
) -> mx.array:
    """`[B, T, num_layers, P]`: every layer's PLE input.

    `embeddings` is the scaled (and multimodally merged) input embedding; ids of
    multimodal placeholders must already be replaced by the pad id.
    """
    width = config.hidden_size_per_layer_input
    shape = (*input_ids.shape, config.num_hidden_layers, width)
    token_part = model.lookup(model.embed_tokens_per_layer, input_ids).reshape(shape)
    context = model.per_layer_model_projection(embeddings) * (config.hidden_size**-0.5)
    context = model.per_layer_projection_norm(context.reshape(shape))
    # One kernel, so no [B, T, layers x P] temporaries beyond its inputs. The token
    # part's scale is rounded to its dtype first, as transformers does.
    return mix(context, token_part, mx.array(math.sqrt(width), dtype=token_part.dtype),
               mx.array(2.0**-0.5, dtype=context.dtype))


def add_layer_weights(layer: nn.Module, config: TextConfig) -> None:
    """Give a decoder layer the gate that mixes its PLE input into the residual."""
    hidden, width = config.hidden_size, config.hidden_size_per_layer_input
    layer.per_layer_input_gate = nn.Linear(hidden, width, bias=False)
    layer.per_layer_projection = nn.Linear(width, hidden, bias=False)
    layer.post_per_layer_input_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)


def layer_input_term(layer: nn.Module, h: mx.array, layer_input: mx.array) -> mx.array:
    """`norm(proj(gelu_tanh(gate(h)) * layer_input))`, to add to the residual `h`."""
    g = geglu(layer.per_layer_input_gate(h), layer_input)
    return layer.post_per_layer_input_norm(layer.per_layer_projection(g))
