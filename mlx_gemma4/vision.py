"""The Gemma 4 vision encoder (`vision_tower`) and its projection into the text
model (`embed_vision`).

One config-driven path serves both encoder sizes: the E2B/E4B one clamps every
projection (`use_clipped_linears`), the 26B/31B one standardises its output
(`standardize`). Input is what the image processor produces: patches
`[batch, max_patches, 3 * patch_size**2]` in [0, 1] and their (column, row)
positions `[batch, max_patches, 2]`, with (-1, -1) marking padding patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import precision
from .attention import attend
from .clippable_linear import ClippableLinear

# Queries per attention block of a large image on the CPU (see `attend_in_blocks`).
CPU_QUERY_BLOCK = 1024
# Patches per tower call: the images of a prompt are encoded in groups that
# hold at most one image at the largest budget (1120 soft tokens, 10 080
# patches), so many images or frames peak as one large image does.
PATCHES_PER_CALL = 10_080


@dataclass
class VisionConfig:
    """The fields of a checkpoint's `vision_config` the encoder uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float
    num_key_value_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "patch_size", "pooling_kernel_size", "position_embedding_size")
        missing = [name for name in required if params.get(name) is None]
        if missing:
            raise ValueError(f"vision_config: missing required field(s) {', '.join(missing)}")
        activation = params.get("hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_activation '{activation}' is not supported")
        rope = params.get("rope_parameters") or {}
        head_dim = params.get("head_dim") or params["hidden_size"] // params["num_attention_heads"]
        if head_dim % 4:
            raise ValueError(f"vision_config.head_dim={head_dim} must be divisible by 4 for 2-D RoPE")
        return cls(
            hidden_size=params["hidden_size"],
            intermediate_size=params["intermediate_size"],
            num_hidden_layers=params["num_hidden_layers"],
            num_attention_heads=params["num_attention_heads"],
            head_dim=head_dim,
            patch_size=params["patch_size"],
            pooling_kernel_size=params["pooling_kernel_size"],
            position_embedding_size=params["position_embedding_size"],
            rope_theta=float(rope.get("rope_theta", params.get("rope_theta", 100.0))),
            num_key_value_heads=params.get("num_key_value_heads") or params["num_attention_heads"],
            rms_norm_eps=params.get("rms_norm_eps", 1e-6),
            use_clipped_linears=bool(params.get("use_clipped_linears", False)),
            standardize=bool(params.get("standardize", False)),
        )


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Axial RoPE on `x` `[B, N, heads, head_dim]`: the first half of each head
    rotates with the column position, the second half with the row position.
    `cos`/`sin` are `[B, N, 2, head_dim / 2]` (axis 2: column, row)."""
    halves = mx.split(x, 2, axis=-1)
    rotated = [
        h * cos[:, :, None, axis] + _rotate_half(h) * sin[:, :, None, axis]
        for axis, h in enumerate(halves)
    ]
    return mx.concatenate(rotated, axis=-1)


def attend_in_blocks(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
    """`attend` over blocks of `CPU_QUERY_BLOCK` queries, each computed before
    the next is built. MLX's CPU attention materialises every head's float32
    [queries, keys] scores, and its eval allocates many primitives' outputs
    ahead of their compute, so blocks built lazily are all alive at once
    (measured no lower); evaluated one by one, only a block's scores exist.
    Budget 1120 (10 080 patches), 2 layers: E2B peak 6.09 -> 1.44 GB and 115 ->
    104 s, 26B-A4B 8.38 -> 1.86 GB and 198 -> 183 s. An image is encoded once
    per prompt: these syncs are not in the decode loop."""
    parts = []
    for start in range(0, q.shape[2], CPU_QUERY_BLOCK):
        parts.append(attend(q[:, :, start:start + CPU_QUERY_BLOCK], k, v, mask))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=2)


class VisionAttention(nn.Module):
    """Bidirectional attention over one image's patches (padding keys masked)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        clipped, hidden, hd = config.use_clipped_linears, config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.eps = config.rms_norm_eps
        self.q_proj = ClippableLinear(hidden, self.n_heads * hd, clipped)
        self.k_proj = ClippableLinear(hidden, self.n_kv_heads * hd, clipped)
        self.v_proj = ClippableLinear(hidden, self.n_kv_heads * hd, clipped)
        self.o_proj = ClippableLinear(self.n_heads * hd, hidden, clipped)
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        self.k_norm = nn.RMSNorm(hd, eps=self.eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        B, N, _ = x.shape
        q = rope_2d(self.q_norm(self.q_proj(x).reshape(B, N, self.n_heads, self.head_dim)), cos, sin)
        k = rope_2d(self.k_norm(self.k_proj(x).reshape(B, N, self.n_kv_heads, self.head_dim)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(B, N, self.n_kv_heads, self.head_dim), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        large = precision.cpu_backend() and N > CPU_QUERY_BLOCK
        out = (attend_in_blocks if large else attend)(q, k, v, mask)  # scale 1, as in the text model
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    """GeGLU feed-forward with (optionally clipped) projections."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        clipped, hidden, inner = config.use_clipped_linears, config.hidden_size, config.intermediate_size
        self.gate_proj = ClippableLinear(hidden, inner, clipped)
        self.up_proj = ClippableLinear(hidden, inner, clipped)
        self.down_proj = ClippableLinear(inner, hidden, clipped)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """Sandwich-normed attention and MLP, as in the text decoder (no layer scalar)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    """The stack of encoder layers (`vision_tower.encoder`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """Linear patch embedding plus a learned embedding per column and per row."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array, is_padding: mx.array) -> mx.array:
        # Pixels arrive in [0, 1]; the encoder was trained on [-1, 1].
        h = self.input_proj(2 * (patches - 0.5))
        index = mx.maximum(positions, 0)
        table = self.position_embedding_table
        position = table[0][index[..., 0]] + table[1][index[..., 1]]
        return h + mx.where(is_padding[..., None], mx.zeros((), position.dtype), position)


class VisionTower(nn.Module):
    """Patches in, one vector per soft token out (`vision_tower`).

    Returns a list with one `[num_soft_tokens, hidden_size]` array per image
    (in `compute_dtype()`): pooled k×k patch averages times sqrt(hidden_size), standardised
    where the config says so. Padding patches never reach the output.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))
        quarter = config.head_dim // 4
        self._inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter)))

    def _rope_tables(self, positions: mx.array, dtype: mx.Dtype):
        """cos/sin `[B, N, 2, head_dim / 2]` for (column, row) positions."""
        angles = positions.astype(mx.float32)[..., None] * self._inv_freq
        angles = mx.concatenate([angles, angles], axis=-1)
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def compute_dtype(self) -> mx.Dtype:
        """float32 when the weights are float16: the activations overflow float16
        (values past 65504 turn into inf/NaN); otherwise the weights' dtype."""
        dtype = self.patch_embedder.position_embedding_table.dtype
        return mx.float32 if dtype == mx.float16 else dtype

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> list:
        dtype = self.compute_dtype()
        positions = position_ids.astype(mx.int32)
        is_padding = (positions == -1).all(axis=-1)
        h = self.patch_embedder(pixel_values.astype(dtype), positions, is_padding).astype(dtype)
        cos, sin = self._rope_tables(positions, dtype)
        mask = (~is_padding)[:, None, None, :]
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask)
        return self._pool(h, positions, is_padding)

    def _pool(self, h: mx.array, positions: mx.array, is_padding: mx.array) -> list:
        """Average every k×k block of real patches and scale by sqrt(hidden), in
        float32 (the scaled values can pass the float16 range), then standardise."""
        dtype = h.dtype
        k = self.config.pooling_kernel_size
        B, N, D = h.shape
        h = mx.where(is_padding[..., None], mx.zeros((), h.dtype), h).astype(mx.float32)
        index = mx.maximum(positions, 0)
        grid_width = index[..., 0].max(axis=-1, keepdims=True) + 1
        slot = index[..., 0] // k + (grid_width // k) * (index[..., 1] // k)
        slots = N // (k * k)
        flat = (slot + mx.arange(B)[:, None] * slots).reshape(-1)
        pooled = mx.zeros((B * slots, D), mx.float32).at[flat].add(h.reshape(-1, D))
        pooled = pooled.reshape(B, slots, D) * (1.0 / (k * k)) * (D**0.5)
        if "std_bias" in self:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        # Real patches fill the grid row-major from slot 0: the first n/k² slots are real.
        counts = ((~is_padding).sum(axis=-1) // (k * k)).tolist()
        return [pooled[b, :count].astype(dtype) for b, count in enumerate(counts)]


class VisionEmbedder(nn.Module):
    """`embed_vision`: scale-free RMSNorm then a projection to the text width."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(vision_hidden_size, text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))
