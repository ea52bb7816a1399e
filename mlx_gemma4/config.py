"""Model configuration, built from a checkpoint's ``config.json``.

Every difference between Gemma 4 variants (E2B, E4B, 26B-A4B, 31B) is a value here;
the model code has one path for all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SLIDING = "sliding_attention"
FULL = "full_attention"

# Top-level model types this package can run. New family members (e.g. the 12B
# `gemma4_unified`, which has no vision/audio encoders) need their own code path.
SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text")
# The multi-token-prediction drafters ("-assistant" checkpoints), see `drafter`.
DRAFTER_MODEL_TYPE = "gemma4_assistant"


def _fill(cls, params: dict, where: str):
    """Build dataclass `cls` from `params`, ignoring unknown keys, naming missing ones."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if params.get(n) is None]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {', '.join(missing)}")
    return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class RopeConfig:
    """Rotary embedding of one attention type."""

    theta: float
    # Fraction of the head dimension that rotates (proportional RoPE); 1.0 = all.
    partial_rotary_factor: float = 1.0


@dataclass
class TextConfig:
    """The Gemma 4 text decoder (`gemma4_text`)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int
    layer_types: list
    rope_parameters: dict
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: Optional[int] = None
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    final_logit_softcapping: Optional[float] = None
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    use_bidirectional_attention: Optional[str] = None
    max_position_embeddings: Optional[int] = None
    pad_token_id: int = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    # transformers >= 5.x saves the global-layer overrides per layer
    # ({"5": {"head_dim": 512, "num_key_value_heads": 2}}) instead of
    # global_head_dim / num_global_key_value_heads; either form is accepted.
    per_layer_config: Optional[dict] = None

    def __post_init__(self):
        where = "text_config"
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"{where}.layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"{where}.layer_types: unknown layer type(s) {unknown}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "sliding_window",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        self._overrides = self._layer_overrides()
        for t in set(self.layer_types):
            if t not in self.rope_parameters:
                raise ValueError(f"{where}.rope_parameters has no entry for '{t}'")
        for layer in range(self.num_hidden_layers):
            heads = self.layer_kv_heads(layer)
            if heads <= 0 or self.num_attention_heads % heads:
                raise ValueError(
                    f"{where}: layer {layer} has {heads} key/value heads, which does not "
                    f"divide num_attention_heads={self.num_attention_heads}"
                )
        # Every layer shared: an MTP drafter, which attends over its target's K/V.
        if not 0 <= self.num_kv_shared_layers <= self.num_hidden_layers:
            raise ValueError(
                f"{where}.num_kv_shared_layers={self.num_kv_shared_layers} must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if 0 < self.num_kv_shared_layers < self.num_hidden_layers:
            owners = set(self.layer_types[: self.first_kv_shared_layer])
            if owners != set(self.layer_types):
                raise ValueError(
                    f"{where}.num_kv_shared_layers={self.num_kv_shared_layers} leaves no "
                    f"earlier layer of type(s) {sorted(set(self.layer_types) - owners)} to share K/V from"
                )
        if self.enable_moe_block:
            for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                if not getattr(self, name):
                    raise ValueError(f"{where}.{name} is required when enable_moe_block is true")
            if self.top_k_experts > self.num_experts:
                raise ValueError(
                    f"{where}.top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}"
                )
        if self.hidden_size_per_layer_input and not self.vocab_size_per_layer_input:
            self.vocab_size_per_layer_input = self.vocab_size

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def kv_source_layer(self, layer: int) -> Optional[int]:
        """The layer whose K/V `layer` attends over: itself unless KV-shared;
        None in a drafter, whose layers all read the target's K/V."""
        if layer < self.first_kv_shared_layer:
            return layer
        return self.last_kv_owner(self.layer_types[layer])

    def last_kv_owner(self, kind: str) -> Optional[int]:
        """The last layer of attention type `kind` that owns its K/V (what KV-shared
        layers and a drafter's layers of that type read); None if there is none."""
        return max((i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == kind), default=None)

    def _layer_overrides(self) -> list:
        if self.per_layer_config is not None:
            return [dict(self.per_layer_config.get(str(i)) or self.per_layer_config.get(i) or {})
                    for i in range(self.num_hidden_layers)]
        full = {"head_dim": self.global_head_dim or self.head_dim}
        # Global layers take their own KV-head count only together with K=V, as transformers does.
        if self.attention_k_eq_v and self.num_global_key_value_heads:
            full["num_key_value_heads"] = self.num_global_key_value_heads
        return [{} if self.is_sliding(i) else full for i in range(self.num_hidden_layers)]

    def layer_head_dim(self, layer: int) -> int:
        return self._overrides[layer].get("head_dim", self.head_dim)

    def layer_kv_heads(self, layer: int) -> int:
        return self._overrides[layer].get("num_key_value_heads", self.num_key_value_heads)

    def layer_intermediate_size(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    def rope(self, layer: int) -> RopeConfig:
        params = self.rope_parameters[self.layer_types[layer]]
        kind = params.get("rope_type", "default")
        if kind not in ("default", "proportional"):
            raise ValueError(f"text_config.rope_parameters: unsupported rope_type '{kind}'")
        return RopeConfig(
            theta=float(params["rope_theta"]),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
        )

    @classmethod
    def from_dict(cls, params: dict) -> "TextConfig":
        return _fill(cls, params, "text_config")


@dataclass
class ModelConfig:
    """A whole checkpoint: the text decoder plus optional vision and audio encoders."""

    model_type: str
    text_config: TextConfig
    # Encoder configs are kept as given; their modules validate what they use.
    vision_config: Optional[dict] = None
    audio_config: Optional[dict] = None
    eos_token_ids: list = field(default_factory=list)
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    audio_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    boa_token_id: Optional[int] = None
    eoa_token_id: Optional[int] = None
    quantization: Optional[dict] = None
    # generation_config.json: sampling defaults and extra stop ids.
    generation: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        """Parse a `config.json` dict (top-level `gemma4` or bare `gemma4_text`)."""
        model_type = config.get("model_type")
        if model_type == DRAFTER_MODEL_TYPE:
            raise ValueError("config.json: this is an MTP drafter (gemma4_assistant), not a model to run alone; "
                             "pass it as the draft model of its Gemma 4 target (--draft-model)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type '{model_type}' is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gemma4_text":
            text = config
        else:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ValueError("config.json: missing required field text_config")
            if text.get("model_type", "gemma4_text") != "gemma4_text":
                raise ValueError(
                    f"config.json: text_config.model_type '{text['model_type']}' is not supported"
                )
        text_config = TextConfig.from_dict(text)
        if text_config.first_kv_shared_layer == 0:
            raise ValueError("config.json: every text layer shares K/V (num_kv_shared_layers = num_hidden_layers), "
                             "which only an MTP drafter does; check num_kv_shared_layers")
        eos = config.get("eos_token_id", text_config.eos_token_id)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(
            model_type=model_type,
            text_config=text_config,
            # mlx-vlm writes {} for an absent encoder.
            vision_config=config.get("vision_config") or None,
            audio_config=config.get("audio_config") or None,
            eos_token_ids=eos,
            image_token_id=config.get("image_token_id"),
            video_token_id=config.get("video_token_id"),
            audio_token_id=config.get("audio_token_id"),
            boi_token_id=config.get("boi_token_id"),
            eoi_token_id=config.get("eoi_token_id"),
            boa_token_id=config.get("boa_token_id"),
            eoa_token_id=config.get("eoa_token_id", config.get("eoa_token_index")),
            quantization=config.get("quantization"),
        )
