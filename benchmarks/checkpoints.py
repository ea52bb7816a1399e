"""Random-weight Gemma 4 checkpoints in the real geometry, shared by the benchmarks.

A checkpoint is an HF-style folder (config.json, sharded bfloat16 safetensors,
index) built once and cached under `benchmarks/.cache/`, keyed by a hash of
its config so a changed geometry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from mlx_gemma4.config import DRAFTER_MODEL_TYPE, FULL, SLIDING, ModelConfig  # noqa: E402
from mlx_gemma4.drafter import Drafter, DrafterConfig  # noqa: E402
from mlx_gemma4.model import Model  # noqa: E402

GB = 1e9
# The released configs, in the `shared` folder beside the checkout.
REFERENCE_CONFIGS = ROOT.parent / "shared" / "reference" / "configs"
SHARD_BYTES = 2 * 10**9
# Largest number of random values generated at once while filling a tensor.
CHUNK_ELEMENTS = 1 << 27
WEIGHT_STD = 0.02

# The text_config fields of the released google/gemma-4-E2B-it and
# gemma-4-26B-A4B-it config.json files (unused training-only fields dropped;
# layer_types is rebuilt from the period of the full-attention layers).
_ROPE = {
    FULL: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
    SLIDING: {"rope_theta": 10000.0, "rope_type": "default"},
}
_COMMON = {
    "model_type": "gemma4_text",
    "attention_bias": False,
    "final_logit_softcapping": 30.0,
    "global_head_dim": 512,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "rope_parameters": _ROPE,
    "tie_word_embeddings": True,
    "vocab_size": 262144,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "dtype": "bfloat16",
}
GEOMETRIES: Dict[str, Tuple[dict, int]] = {
    # name: (text_config without layer_types, period of full-attention layers)
    "e2b": (
        {
            **_COMMON,
            "attention_k_eq_v": False,
            "enable_moe_block": False,
            "hidden_size": 1536,
            "hidden_size_per_layer_input": 256,
            "intermediate_size": 6144,
            "max_position_embeddings": 131072,
            "num_attention_heads": 8,
            "num_global_key_value_heads": None,
            "num_hidden_layers": 35,
            "num_key_value_heads": 1,
            "num_kv_shared_layers": 20,
            "sliding_window": 512,
            "use_double_wide_mlp": True,
            "vocab_size_per_layer_input": 262144,
        },
        5,
    ),
    "26b-a4b": (
        {
            **_COMMON,
            "attention_k_eq_v": True,
            "enable_moe_block": True,
            "hidden_size": 2816,
            "hidden_size_per_layer_input": 0,
            "intermediate_size": 2112,
            "max_position_embeddings": 262144,
            "moe_intermediate_size": 704,
            "num_attention_heads": 16,
            "num_experts": 128,
            "num_global_key_value_heads": 2,
            "num_hidden_layers": 30,
            "num_key_value_heads": 8,
            "num_kv_shared_layers": 0,
            "sliding_window": 1024,
            "top_k_experts": 8,
            "use_bidirectional_attention": "vision",
            "use_double_wide_mlp": False,
        },
        6,
    ),
    "31b": (
        {
            **_COMMON,
            "attention_k_eq_v": True,
            "enable_moe_block": False,
            "hidden_size": 5376,
            "hidden_size_per_layer_input": 0,
            "intermediate_size": 21504,
            "max_position_embeddings": 262144,
            "num_attention_heads": 32,
            "num_global_key_value_heads": 4,
            "num_hidden_layers": 60,
            "num_key_value_heads": 16,
            "num_kv_shared_layers": 0,
            "sliding_window": 1024,
            "use_bidirectional_attention": "vision",
            "use_double_wide_mlp": False,
        },
        6,
    ),
}

# The released google/gemma-4-E2B-it-assistant config.json (the E2B MTP drafter;
# no other drafter config was available).
E2B_DRAFTER = {
    "architectures": ["Gemma4AssistantForCausalLM"],
    "model_type": "gemma4_assistant",
    "backbone_hidden_size": 1536,
    "use_ordered_embeddings": True,
    "num_centroids": 2048,
    "centroid_intermediate_top_k": 32,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
    "text_config": {
        **_COMMON,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "final_logit_softcapping": None,
        "hidden_size": 256,
        "hidden_size_per_layer_input": 0,
        "intermediate_size": 2048,
        "layer_types": [SLIDING, SLIDING, SLIDING, FULL],
        "max_position_embeddings": 131072,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 1,
        "num_kv_shared_layers": 4,
        "sliding_window": 512,
        "use_double_wide_mlp": False,
        "vocab_size_per_layer_input": 0,
    },
}

# ---------------------------------------------------------------------------
# Geometry and random checkpoint


def real_text_config(geometry: str) -> dict:
    """The released text_config of `geometry`, all layers."""
    text, period = GEOMETRIES[geometry]
    n = text["num_hidden_layers"]
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]
    return {**text, "layer_types": types}


def cut_layers(text: dict, n: int) -> dict:
    """`text` with only its first `n` layers.

    The last layer is made full attention (as Gemma 4 requires) and
    `num_kv_shared_layers` shrinks in proportion, but leaves at least one
    K/V-owning layer of each attention type so that sharing still works.
    """
    full_n = text["num_hidden_layers"]
    if not 1 <= n <= full_n:
        raise ValueError(f"--layers must be in [1, {full_n}], got {n}")
    types = text["layer_types"][:n]
    types[-1] = FULL
    owners_needed = max(types.index(t) for t in set(types)) + 1
    shared = min(round(text["num_kv_shared_layers"] * n / full_n), n - owners_needed)
    return {**text, "num_hidden_layers": n, "layer_types": types, "num_kv_shared_layers": shared}


def checkpoint_config(text: dict) -> dict:
    """A text-only `config.json` (no encoders) around `text`."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": None,
        "audio_config": None,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "dtype": "bfloat16",
    }


def parameter_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """MLX parameter names and shapes of the model (or drafter) `config` describes.

    The model is built but never evaluated, so no weight memory is allocated.
    """
    if config["model_type"] == DRAFTER_MODEL_TYPE:
        model = Drafter(DrafterConfig.from_dict(config))
    else:
        model = Model(ModelConfig.from_dict(config))
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def random_tensor(shape: Tuple[int, ...]) -> mx.array:
    """A bfloat16 weight: ones for 1-D tensors (norm weights, scales,
    `layer_scalar`), else normal with std `WEIGHT_STD`.

    Large tensors are filled in place, `CHUNK_ELEMENTS` at a time along
    axis 0, so the temporaries of the generator stay small.
    """
    if len(shape) == 1:
        return mx.ones(shape, dtype=mx.bfloat16)
    step = max(1, CHUNK_ELEMENTS // math.prod(shape[1:]))
    if step >= shape[0]:
        return mx.random.normal(shape, dtype=mx.bfloat16, scale=WEIGHT_STD)
    out = mx.zeros(shape, dtype=mx.bfloat16)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        out[start:stop] = mx.random.normal((stop - start, *shape[1:]), dtype=mx.bfloat16, scale=WEIGHT_STD)
        mx.eval(out)
    return out


def plan_shards(shapes: Dict[str, Tuple[int, ...]]) -> List[List[str]]:
    """Group tensor names into shards of at most `SHARD_BYTES` of bfloat16
    (a tensor larger than that gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def build_checkpoint(folder: Path, config: dict, seed: int,
                     make_tensor: Optional[Callable[[str, Tuple[int, ...]], mx.array]] = None) -> None:
    """Write a random bfloat16 checkpoint for `config` into `folder`
    (`make_tensor(name, shape)` draws each tensor; default `random_tensor`).

    Built in a temporary sibling folder and renamed at the end, so an
    interrupted build never leaves a folder that looks complete.
    """
    make_tensor = make_tensor or (lambda name, shape: random_tensor(shape))
    shapes = parameter_shapes(config)
    shards = plan_shards(shapes)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mx.random.seed(seed)
    weight_map: Dict[str, str] = {}
    total = 0
    start = time.perf_counter()
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = make_tensor(name, shapes[name])
            mx.eval(tensors[name])
        mx.save_safetensors(str(partial / file), tensors, metadata={"format": "mlx"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
        mx.clear_cache()
        log(f"  {file}: {total / GB:.2f} GB written, {time.perf_counter() - start:.0f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(folder)


def ensure_checkpoint(cache_dir: Path, geometry: str, layers: int, seed: int) -> Path:
    """The cached checkpoint folder for `geometry` cut to `layers`, built if missing.

    The folder name carries a hash of the config and seed, so a changed
    geometry never reuses stale weights.
    """
    config = checkpoint_config(cut_layers(real_text_config(geometry), layers))
    return cached_build(cache_dir / f"{geometry}-{layers}L", [config, seed, WEIGHT_STD],
                        lambda folder: build_checkpoint(folder, config, seed))


def ensure_drafter(cache_dir: Path, seed: int) -> Path:
    """The cached random E2B drafter (`E2B_DRAFTER`), built if missing; its
    `token_ordering` is a random permutation of the vocabulary."""
    def tensor(name: str, shape: Tuple[int, ...]) -> mx.array:
        if name == "masked_embedding.token_ordering":
            return mx.random.permutation(shape[0]).astype(mx.int32)
        return random_tensor(shape)

    return cached_build(cache_dir / "e2b-drafter", [E2B_DRAFTER, seed, WEIGHT_STD],
                        lambda folder: build_checkpoint(folder, E2B_DRAFTER, seed, tensor))


def cached_build(stem: Path, key: list, build: Callable[[Path], None]) -> Path:
    """`stem`-<hash of key>, built by `build(folder)` unless it already exists."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = stem.with_name(f"{stem.name}-{digest}")
    if not folder.is_dir():
        log(f"building random checkpoint {folder}")
        start = time.perf_counter()
        build(folder)
        log(f"  built in {time.perf_counter() - start:.0f} s")
    return folder


def mlx_vlm_view(folder: Path, into: Path) -> Path:
    """`folder` as mlx-vlm reads it: its config parser rejects the explicit
    `"vision_config": null` of a text-only config, so those keys are dropped
    (the weight files are linked, not copied)."""
    into.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if not (k.endswith("_config") and v is None)}
    (into / "config.json").write_text(json.dumps(config, indent=2))
    for file in folder.iterdir():
        if file.name != "config.json":
            (into / file.name).symlink_to(file.resolve())
    return into


# ---------------------------------------------------------------------------
# Shared reporting helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> Dict[str, str]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "cpu": cpu, "cpus": str(os.cpu_count()), "ram_gb": f"{ram / GB:.1f}",
            "mlx": mx.__version__, "device": str(mx.default_device()),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
