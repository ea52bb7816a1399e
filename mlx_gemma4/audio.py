"""The Gemma 4 audio encoder (E2B/E4B): a conformer over log-mel frames, and its projection into the text model.

Layout and names follow the checkpoint (``audio_tower.*``, ``embed_audio.*`` once ``model.`` is stripped):
two stride-2 convolutions subsample the mel frames 4x in time; each conformer block is a half-step feed-forward,
chunked local self-attention with a relative-position term, a causal depthwise convolution module, a second
half-step feed-forward and a final norm. ``AudioEmbedder`` maps the encoder output to text-embedding space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .clippable_linear import ClippableLinear
from .config import _fill

# transformers builds the feed-forward and block norms with its own default eps instead of config.rms_norm_eps
# (only the convolution module's norms and the subsampling LayerNorms read the config); keep that split.
_DEFAULT_NORM_EPS = 1e-6


@dataclass
class AudioConfig:
    """``audio_config`` of a Gemma 4 checkpoint (defaults are transformers' ``Gemma4AudioConfig`` defaults)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    subsampling_conv_channels: list
    output_proj_dims: int
    conv_kernel_size: int = 5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    residual_weight: float = 0.5
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"audio_config.hidden_act '{self.hidden_act}' is not supported (only silu)")
        if len(self.subsampling_conv_channels) != 2:
            raise ValueError("audio_config.subsampling_conv_channels must have two entries")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("audio_config.hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_dict(cls, params: dict) -> "AudioConfig":
        return _fill(cls, params, "audio_config")


def _clamp(x: mx.array, limit: float) -> mx.array:
    """Symmetric clamp at `limit`, capped at the dtype's range so that the bound itself is representable."""
    bound = min(limit, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)


class SubsampleLayer(nn.Module):
    """3x3 stride-2 convolution over (time, frequency), LayerNorm over channels, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
        # Padded frames are zeroed first so they cannot leak into valid outputs through the kernel.
        x = x * mask[:, :, None, None].astype(x.dtype)
        x = nn.relu(self.norm(self.conv(x)))
        return x, mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    """Mel frames ``[B, T, mels]`` → ``[B, ceil(ceil(T/2)/2), hidden]``."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        # Sized as transformers sizes it; this equals (mels / 4) * c1 for the 128-mel front end.
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        batch, time = x.shape[:2]
        # Flatten (frequency, channel) with the channel fastest.
        return self.input_proj_linear(x.reshape(batch, time, -1)), mask


class FeedForward(nn.Module):
    """Half-step (``residual_weight``) macaron feed-forward with SiLU."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(hidden, hidden * 4, clipped)
        self.ffw_layer_2 = ClippableLinear(hidden * 4, hidden, clipped)
        self.pre_layer_norm = nn.RMSNorm(hidden, eps=_DEFAULT_NORM_EPS)
        self.post_layer_norm = nn.RMSNorm(hidden, eps=_DEFAULT_NORM_EPS)
        self.clip = config.gradient_clipping
        self.scale = config.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clamp(x, self.clip))
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clamp(h, self.clip)) * self.scale


class CausalDepthwiseConv1d(nn.Module):
    """Per-channel causal convolution over time; ``weight`` is ``[channels, kernel, 1]`` (MLX conv layout)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, 1))

    def __call__(self, x: mx.array) -> mx.array:
        kernel = self.weight.shape[1]
        time = x.shape[1]
        padded = mx.pad(x, [(0, 0), (kernel - 1, 0), (0, 0)])
        taps = self.weight[:, :, 0].astype(x.dtype)
        out = padded[:, :time] * taps[:, 0]
        for j in range(1, kernel):
            out = out + padded[:, j : j + time] * taps[:, j]
        return out


class LightConv1d(nn.Module):
    """Conformer convolution module: GLU, causal depthwise convolution, norm, SiLU, projection, residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.linear_start = ClippableLinear(hidden, hidden * 2, clipped)
        self.linear_end = ClippableLinear(hidden, hidden, clipped)
        self.depthwise_conv1d = CausalDepthwiseConv1d(hidden, config.conv_kernel_size)
        self.pre_layer_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.conv_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.clip = config.gradient_clipping

    def __call__(self, x: mx.array) -> mx.array:
        a, gate = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = self.depthwise_conv1d(a * mx.sigmoid(gate))
        h = nn.silu(self.conv_norm(_clamp(h, self.clip)))
        return x + self.linear_end(h)


class ChunkedAttention(nn.Module):
    """Local self-attention: queries in blocks of ``attention_chunk_size``, each block seeing a window of keys
    around it; logits get a learned relative-position term and a tanh soft cap. Computed in float32."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.heads = config.num_attention_heads
        self.head_dim = hidden // self.heads
        self.q_proj = ClippableLinear(hidden, hidden, clipped)
        self.k_proj = ClippableLinear(hidden, hidden, clipped)
        self.v_proj = ClippableLinear(hidden, hidden, clipped)
        self.post = ClippableLinear(hidden, hidden, clipped)
        self.relative_k_proj = nn.Linear(hidden, hidden, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        # log2-based scales of the original implementation: q by 1/(sqrt(d) ln 2), k by softplus(1)/ln 2.
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.cap = config.attention_logit_cap
        self.invalid = config.attention_invalid_logits_value

    def __call__(self, x: mx.array, blocks: AttentionBlocks) -> mx.array:
        batch, time, _ = x.shape
        shape = (batch, time, self.heads, self.head_dim)
        q = self.q_proj(x).astype(mx.float32).reshape(shape)
        k = self.k_proj(x).astype(mx.float32).reshape(shape)
        v = self.v_proj(x).astype(mx.float32).reshape(shape)
        q = q * (self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32)))
        k = k * self.k_scale

        n, c = blocks.num_blocks, blocks.chunk
        q = mx.pad(q, [(0, 0), (0, n * c - time), (0, 0), (0, 0)]).reshape(batch, n, c, self.heads, self.head_dim)
        q = q.transpose(0, 3, 1, 2, 4)  # [B, H, n, c, d]
        k = blocks.gather(k).transpose(0, 3, 1, 4, 2)  # [B, H, n, d, ctx]
        v = blocks.gather(v).transpose(0, 3, 1, 2, 4)  # [B, H, n, ctx, d]

        rel = self.relative_k_proj(blocks.positions.astype(x.dtype)).astype(mx.float32)
        rel = rel.reshape(-1, self.heads, self.head_dim).transpose(1, 2, 0)  # [H, d, P]
        logits = q @ k + blocks.shift(q @ rel[:, None])
        logits = mx.tanh(logits / self.cap) * self.cap
        logits = mx.where(blocks.valid, logits, self.invalid)
        out = mx.softmax(logits, axis=-1, precise=True) @ v  # [B, H, n, c, d]
        out = out.transpose(0, 2, 3, 1, 4).reshape(batch, n * c, -1)[:, :time]
        return self.post(out.astype(x.dtype))


class AttentionBlocks:
    """The block geometry of one forward pass, shared by every layer: key windows, validity, positions."""

    def __init__(self, config: AudioConfig, mask: mx.array):
        self.chunk = c = config.attention_chunk_size
        self.past = past = config.attention_context_left - 1
        future = config.attention_context_right
        self.context = ctx = c + past + future
        batch, time = mask.shape
        self.num_blocks = n = -(-time // c)
        self.time = time
        self.pad = (past, future + c - 1)
        # Key j of block b sits at time b*c - past + j.
        self.index = mx.arange(n)[:, None] * c + mx.arange(ctx)[None, :]
        key_pos = self.index - past
        query_pos = mx.arange(n)[:, None, None] * c + mx.arange(c)[None, :, None]
        dist = query_pos - key_pos[:, None, :]  # [n, c, ctx]
        in_window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future))
        padded_mask = mx.pad(mask, [(0, 0), self.pad], constant_values=False)
        key_valid = padded_mask[:, self.index]  # [B, n, ctx]; False outside the clip
        self.valid = (in_window[None] & key_valid[:, :, None, :])[:, None]  # [B, 1, n, c, ctx]
        self.positions = _relative_positions(ctx // 2, config.hidden_size)

    def gather(self, x: mx.array) -> mx.array:
        """``[B, T, H, d]`` → ``[B, n, ctx, H, d]``: each block's key window (zeros outside the clip)."""
        x = mx.pad(x, [(0, 0), self.pad, (0, 0), (0, 0)])
        return x[:, self.index]

    def shift(self, scores: mx.array) -> mx.array:
        """Transformer-XL relative shift: scores against distances ``P..0`` ``[B, H, n, c, P+1]`` → per-key
        ``[B, H, n, c, ctx]``, by padding each row to ``ctx + 1`` and re-reading the flat buffer ``ctx`` wide."""
        b, h, n, c, p = scores.shape
        ctx = self.context
        scores = mx.pad(scores, [(0, 0)] * 4 + [(0, ctx + 1 - p)]).reshape(b, h, n, c * (ctx + 1))
        return scores[..., : c * ctx].reshape(b, h, n, c, ctx)


def _relative_positions(max_distance: int, dims: int) -> mx.array:
    """Sinusoidal embeddings ``[max_distance + 1, dims]`` of distances ``max_distance..0`` (sin half, cos half)."""
    count = dims // 2
    step = math.log(1.0e4) / max(count - 1, 1)
    inv_timescales = mx.exp(mx.arange(count, dtype=mx.float32) * -step)
    distances = mx.arange(max_distance, -1, -1, dtype=mx.float32)[:, None]
    scaled = distances * inv_timescales[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


class ConformerLayer(nn.Module):
    """feed-forward ½ → attention → convolution → feed-forward ½ → norm."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = ChunkedAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = nn.RMSNorm(hidden, eps=_DEFAULT_NORM_EPS)
        self.norm_post_attn = nn.RMSNorm(hidden, eps=_DEFAULT_NORM_EPS)
        self.norm_out = nn.RMSNorm(hidden, eps=_DEFAULT_NORM_EPS)
        self.clip = config.gradient_clipping

    def __call__(self, x: mx.array, blocks: AttentionBlocks) -> mx.array:
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), blocks)
        x = x + self.norm_post_attn(_clamp(a, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class AudioEncoder(nn.Module):
    """``audio_tower``: log-mel features and their frame mask → encoder states and the subsampled mask."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def __call__(self, features: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
        """``features [B, T, mels]``, ``mask [B, T]`` (True = real frame) → ``([B, T', output_proj_dims], [B, T'])``
        with ``T' = ceil(ceil(T / 2) / 2)``; positions where the returned mask is False are padding."""
        # A norm weight gives the compute dtype (projection weights may be quantized integers).
        dtype = self.subsample_conv_projection.layer0.norm.weight.dtype
        x, mask = self.subsample_conv_projection(features.astype(dtype), mask.astype(mx.bool_))
        blocks = AttentionBlocks(self.config, mask)
        for layer in self.layers:
            x = layer(x, blocks)
        return self.output_proj(x), mask

    @staticmethod
    def sanitize_conv_weight(key: str, value: mx.array, config: AudioConfig) -> mx.array:
        """Checkpoint convolution weights in MLX layout, whether stored PyTorch-style or already converted."""
        if key.endswith("depthwise_conv1d.weight") and value.ndim == 3 and value.shape[-1] != 1:
            return value.transpose(0, 2, 1)  # [C, 1, k] → [C, k, 1]
        if "subsample_conv_projection" in key and key.endswith("conv.weight") and value.ndim == 4:
            in_channels = 1 if ".layer0." in key else config.subsampling_conv_channels[0]
            torch_layout = value.shape[1] == in_channels and value.shape[-1] != in_channels
            return value.transpose(0, 2, 3, 1) if torch_layout else value  # [O, I, kH, kW] → [O, kH, kW, I]
        return value


class AudioEmbedder(nn.Module):
    """``embed_audio``: scale-free RMSNorm, then a projection into the text hidden size."""

    def __init__(self, config: AudioConfig, text_hidden_size: int):
        super().__init__()
        self.embedding_projection = nn.Linear(config.output_proj_dims, text_hidden_size, bias=False)
        self.eps = config.rms_norm_eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


def valid_rows(features: mx.array, mask: mx.array) -> mx.array:
    """The rows of ``features [B, T, D]`` where ``mask`` is True, batch-major: ``[sum(mask), D]``."""
    index = mx.array(np.flatnonzero(np.array(mask).reshape(-1)).astype(np.int32))
    return features.reshape(-1, features.shape[-1])[index]
