"""Guards of the performance levers; nothing here is timed."""

import ast
import copy
import math
import re
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

import mlx_gemma4
from mlx_gemma4 import attention, loader
from mlx_gemma4 import moe as moe_module
from mlx_gemma4 import precision
from mlx_gemma4 import streams as streams_module
from mlx_gemma4.cache import attention_masks
from mlx_gemma4.kernels import add_and_widen
from mlx_gemma4.loader import load_model
from test_text_parity import greedy_mlx

PACKAGE = Path(mlx_gemma4.__file__).parent
LAYER_MODULES = ("attention.py", "mlp.py", "moe.py", "ple.py", "text.py", "kernels.py", "fusion.py", "cache.py")


# Primitives that are views of their input (no kernel on Metal).
VIEWS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Transpose", "Slice", "Split", "Flatten", "Unflatten"}


def graph_labels(*outputs) -> list:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return re.findall(r'label ="([^"]+)", shape=rectangle', f.read())




@pytest.fixture(scope="module")
def e2b(tiny_checkpoint):
    return load_model(tiny_checkpoint("e2b", with_towers=False))


@pytest.fixture(scope="module")
def moe(tiny_checkpoint):
    return load_model(tiny_checkpoint("26b", with_towers=False))


@pytest.fixture(scope="module")
def four_bit(tiny_checkpoint, tmp_path_factory):
    """Factory: `four_bit(variant, dtype)`, the text-only tiny checkpoint stored in
    `dtype` and converted to 4 bits (group 32), converted once per module."""
    from convert import convert

    built = {}

    def get(variant: str, dtype: str = "float32") -> Path:
        if (variant, dtype) not in built:
            out = tmp_path_factory.mktemp("q4") / f"{variant}-{dtype}"
            convert(tiny_checkpoint(variant, dtype=dtype, with_towers=False), out, quantize=True, q_bits=4,
                    q_group_size=32, report=False, progress=False, log=lambda *a: None)
            built[variant, dtype] = out
        return built[variant, dtype]

    return get


def test_auto_policy_computes_in_float32_on_cpu_and_in_the_checkpoint_dtype_on_gpu():
    assert precision.compute_dtype(None, mx.bfloat16, mx.Device(mx.cpu)) == mx.float32
    assert precision.compute_dtype("auto", mx.bfloat16, mx.Device(mx.gpu)) == mx.bfloat16
    assert precision.compute_dtype("float16", mx.bfloat16, mx.Device(mx.cpu)) == mx.float16
    with pytest.raises(ValueError):
        precision.compute_dtype("int8", mx.bfloat16)


def test_cast_never_grows_packed_weights_nor_makes_towers_float16():
    weights = {
        "language_model.model.layers.0.mlp.up_proj.weight": mx.zeros((4, 8), mx.uint32),
        "language_model.model.layers.0.mlp.up_proj.scales": mx.zeros((4, 1), mx.bfloat16),
        "language_model.model.layers.0.input_layernorm.weight": mx.zeros((8,), mx.bfloat16),
        "language_model.model.embed_tokens_per_layer.weight": mx.zeros((16, 8), mx.bfloat16),
        "vision_tower.proj.weight": mx.zeros((8, 8), mx.float32),
    }
    up = precision.cast_weights(weights, mx.float32, tied_embedding=True)
    assert up["language_model.model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32
    assert up["language_model.model.layers.0.mlp.up_proj.scales"].dtype == mx.bfloat16  # would grow
    assert up["language_model.model.layers.0.input_layernorm.weight"].dtype == mx.float32
    assert up["language_model.model.embed_tokens_per_layer.weight"].dtype == mx.bfloat16  # lookup only
    head = {"language_model.model.embed_tokens.weight": mx.zeros((16, 1), mx.uint32),
            "language_model.model.embed_tokens.scales": mx.zeros((16, 1), mx.bfloat16)}
    for tied in (True, False):  # the LM head's per-call casts are bounded by splitting (`quantized`)
        assert precision.cast_weights(head, mx.float32, tied)["language_model.model.embed_tokens.scales"].dtype == mx.bfloat16
    router = {"language_model.model.layers.0.router.proj.weight": mx.zeros((4, 8), mx.bfloat16)}
    for dtype in (mx.float32, mx.bfloat16):  # bfloat16: a GPU computing in the stored dtype
        assert precision.cast_weights(router, dtype, True)["language_model.model.layers.0.router.proj.weight"].dtype == mx.float32
    down = precision.cast_weights(weights, mx.float16, tied_embedding=True)
    assert down["vision_tower.proj.weight"].dtype == mx.float32
    assert down["language_model.model.layers.0.mlp.up_proj.scales"].dtype == mx.float16


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_auto_policy_greedy_equals_float32_reference(four_bit, variant):
    """A 4-bit bfloat16 checkpoint: the default (auto) load decodes exactly as an
    explicit float32 load, in float32 activations."""
    out = four_bit(variant, "bfloat16")
    auto, reference = load_model(out), load_model(out, dtype="float32")
    ids = np.arange(4, 28, dtype=np.int32)[None]
    assert auto.language_model.model.embed(mx.array(ids)).dtype == mx.float32
    assert greedy_mlx(auto, ids, 12) == greedy_mlx(reference, ids, 12)


def test_projections_are_fused_and_elementwise_chains_compiled(e2b):
    layer = e2b.language_model.model.layers[0]
    assert "qkv_proj" in layer.self_attn and "q_proj" not in layer.self_attn
    assert "gate_up_proj" in layer.mlp and "gate_proj" not in layer.mlp
    labels = graph_labels(layer.mlp(mx.ones((1, 1, e2b.config.text_config.hidden_size))))
    assert sum(label.startswith("Compiled") for label in labels) == 1
    assert labels.count("Matmul") + labels.count("QuantizedMatmul") == 2  # gate_up and down


def test_experts_run_as_batched_gathers_without_a_python_loop(moe):
    layer = moe.language_model.model.layers[0]
    assert "gate_up_proj" in layer.experts.switch_glu
    h = mx.ones((1, 3, moe.config.text_config.hidden_size))
    routing = layer.router(h)
    labels = graph_labels(layer.experts(h, *routing))
    gathers = [label for label in labels if label.startswith("Gather") and label.endswith("MM")]
    assert len(gathers) == 2  # fused gate/up, then down: one each for all tokens and experts
    source = (PACKAGE / "moe.py").read_text()
    assert "for " not in ast.get_source_segment(source, _function(source, "ExpertGLU", "__call__"))


def _function(source, cls, name):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == name)
    raise AssertionError(f"{cls}.{name} not found")


def test_kv_shared_layers_allocate_no_cache_and_sliding_caches_stay_bounded(e2b):
    text = e2b.config.text_config
    cache = e2b.make_cache()
    assert len(cache) == text.first_kv_shared_layer < text.num_hidden_layers
    for layer in e2b.language_model.model.layers[text.first_kv_shared_layer:]:
        assert "k_proj" not in layer.self_attn and "qkv_proj" not in layer.self_attn
    window = text.sliding_window
    e2b(mx.arange(4, 4 + 2 * window)[None], cache)
    sizes = {}
    for step in range(window + 3):
        e2b(mx.array([[5 + step % 7]]), cache)
        for i, c in enumerate(cache):
            if text.is_sliding(i):
                assert c.keys.shape[2] == window
                sizes.setdefault(i, c.keys.shape)
                assert c.keys.shape == sizes[i]  # written in place, never reallocated larger


def test_decode_step_builds_no_mask_and_layers_never_sync_with_the_host(e2b):
    cache = e2b.make_cache()
    e2b(mx.arange(4, 40)[None], cache)
    assert set(attention_masks(e2b.config.text_config, 1, cache).values()) == {None}
    for name in LAYER_MODULES:
        source = (PACKAGE / name).read_text()
        assert ".item()" not in source and ".tolist()" not in source, name


def test_a_generated_token_is_not_checked_for_image_blocks(moe, monkeypatch):
    """26B/31B check each call for a split image block with one host sync; a generated token needs no check, and a
    sync there would make the decode loop wait for each step before building the next."""
    cache = moe.make_cache()
    moe(mx.arange(4, 40)[None], cache)
    stacks = _count_calls(monkeypatch, mx, "stack")  # the check reads its two flags through one mx.stack
    moe(mx.array([[7]]), cache)
    assert stacks == []
    moe(mx.array([[7, 8]]), cache)
    assert stacks == ["stack"]


def _count_calls(monkeypatch, space, name) -> list:
    calls = []
    original = getattr(space, name)
    monkeypatch.setattr(space, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def test_q_k_v_heads_take_one_norm_and_one_kernel_after_their_projection(e2b, moe, monkeypatch):
    """GPU route: Q|K|V heads are normed by one weightless `rms_norm`, then one
    compiled kernel scales the Q|K heads and rotates them (no `mx.fast.rope`, no
    separate multiply); a KV-shared layer's queries take the same two."""
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    norms = []
    # A stand-in norm whose graph is one recognisable primitive (MLX's CPU norm is a chain).
    monkeypatch.setattr(mx.fast, "rms_norm", lambda y, weight, eps: norms.append(weight) or mx.sqrt(y))
    ropes = _count_calls(monkeypatch, mx.fast, "rope")
    for model in (e2b, moe):  # separate V projection, and K=V on the global layers
        for i, layer in enumerate(model.language_model.model.layers):
            attn = layer.self_attn
            x = mx.ones((1, 3, model.config.text_config.hidden_size))
            mx.eval(x)
            norms.clear()
            if attn.owns_kv:
                outputs = attn._queries_keys_values(x, 5)
            else:
                heads = (1, attn.n_kv_heads, 8, attn.head_dim)
                outputs = attn(x, None, 5, shared_kv=(mx.zeros(heads), mx.zeros(heads)))[0]
            assert norms == [None] and ropes == [], i
            if attn.owns_kv:  # the projection, the norm, and one kernel for Q, K and V
                kernels = [label for label in graph_labels(*outputs) if label not in VIEWS]
                assert len(kernels) == 3 and {"Matmul", "Sqrt"} < set(kernels), (i, kernels)
                assert sum(label.startswith("Compiled") for label in kernels) == 1, (i, kernels)


@pytest.mark.parametrize("offset", [0, 21])
@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("cpu", [True, False])
def test_norm_and_rotation_equal_mlx_fast_exactly(e2b, moe, tokens, offset, cpu, monkeypatch):
    """Q/K/V's norms and RoPE (one compiled kernel for the weights and the
    rotation; on the CPU, the norm's scale too) give the same bits as
    `mx.fast.rms_norm` and `mx.fast.rope`: K/V-owning and KV-shared layers,
    sliding and p-RoPE global, with V heads and with K=V."""
    monkeypatch.setattr(precision, "cpu_backend", lambda: cpu)
    mx.random.seed(tokens + offset)
    for model in (e2b, moe):
        text = model.config.text_config
        for i, layer in enumerate(model.language_model.model.layers):
            attn = layer.self_attn
            x = mx.random.normal((1, tokens, text.hidden_size))
            mx.eval(x)
            rope = text.rope(i)
            if rope.partial_rotary_factor < 1.0:  # p-RoPE: mx.fast.rope takes the periods
                rotated = int(rope.partial_rotary_factor * attn.head_dim / 2)
                periods = rope.theta ** (mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / attn.head_dim)
                freqs = mx.concatenate([periods, mx.full((attn.head_dim // 2 - rotated,), mx.inf)])
                rotation = dict(base=None, freqs=freqs)
            else:
                rotation = dict(base=rope.theta)

            def reference(heads, norm):
                normed = mx.fast.rms_norm(heads, norm, attn.eps).transpose(0, 2, 1, 3)
                return mx.fast.rope(normed, attn.head_dim, traditional=False, scale=1.0, offset=offset, **rotation)

            if attn.owns_kv:
                q, k, v = attn._queries_keys_values(x, offset)
                y = (attn.qkv_proj(x)).reshape(1, tokens, -1, attn.head_dim)
                expected_q = reference(y[:, :, :attn.n_heads], attn.q_norm.weight)
                expected_k = reference(y[:, :, attn.n_heads:attn.n_heads + attn.n_kv_heads], attn.k_norm.weight)
                v_heads = y[:, :, -attn.n_kv_heads:]  # the V heads, or with K=V the K heads
                expected_v = mx.fast.rms_norm(v_heads, None, attn.eps).transpose(0, 2, 1, 3)
                assert mx.array_equal(k, expected_k).item() and mx.array_equal(v, expected_v).item(), i
            else:  # the queries the layer itself attends with, over zero K/V
                queries = []
                with monkeypatch.context() as patch:
                    patch.setattr(attention, "attend", lambda q, k, v, mask: queries.append(q) or q)
                    heads = (1, attn.n_kv_heads, offset + tokens, attn.head_dim)
                    attn(x, None, offset, shared_kv=(mx.zeros(heads), mx.zeros(heads)))
                q = queries[0]
                expected_q = reference(attn.q_proj(x).reshape(1, tokens, -1, attn.head_dim), attn.q_norm.weight)
            assert mx.array_equal(q, expected_q).item(), i


def test_cpu_norm_and_rotation_keep_bfloat16_activations_bfloat16():
    """`--dtype bfloat16` on the CPU: the norm runs in float32 (as MLX's does),
    the heads come back in bfloat16, within its rounding of `mx.fast`'s."""
    y = (mx.random.normal((1, 7, 5, 64), key=mx.random.key(0)) * 3).astype(mx.bfloat16)
    weight = mx.random.normal((4, 64), key=mx.random.key(1)).astype(mx.bfloat16)
    rotated, plain = attention.norm_and_rotate(y, weight, 4, 3, attention.inverse_frequencies(64, 1e4, 1.0), 5, 1e-6)
    normed = mx.fast.rms_norm(y, None, 1e-6)
    expected = mx.fast.rope((normed[:, :, :4] * weight).transpose(0, 2, 1, 3), 64, traditional=False, base=1e4,
                            scale=1.0, offset=5)
    assert rotated.dtype == plain.dtype == mx.bfloat16
    assert mx.allclose(rotated, expected, rtol=2e-2, atol=2e-2).item()
    assert mx.allclose(plain, normed[:, :, 3:].transpose(0, 2, 1, 3), rtol=1e-2, atol=1e-2).item()


def test_moe_layer_norms_its_residual_once_and_routes_in_one_kernel_each(moe, monkeypatch):
    """An MoE layer's three norms of the residual stream (dense MLP, experts,
    router) are one weightless norm of the float32 sum that the residual add
    also writes, and one kernel for the two weights; the routing weights and
    per-expert scales enter the experts' GeGLU kernel, and one matmul sums the
    experts (no separate multiply or cast)."""
    layer = moe.language_model.model.layers[0]
    hidden = moe.config.text_config.hidden_size
    h, a = (mx.random.normal((1, 1, hidden)).astype(mx.bfloat16) for _ in range(2))
    mx.eval(h, a)
    norms = []
    monkeypatch.setattr(mx.fast, "rms_norm", lambda y, weight, eps: norms.append(weight) or mx.sqrt(y))
    h, h32 = add_and_widen(h, a)
    dense, experts_input, normed = layer.feed_forward_inputs(h32)
    assert norms == [None]
    kernels = [label for label in graph_labels(dense, experts_input) if label not in VIEWS]
    assert len(kernels) == 3 and kernels[1] == "Sqrt", kernels
    assert kernels[0].startswith("Compiled") and "AddAsType" in kernels[0] and kernels[2].startswith("Compiled")
    assert h.dtype == mx.bfloat16 and h32.dtype == mx.float32
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)  # the GPU route
    routing = layer.router(normed)
    mx.eval(routing, experts_input)
    kernels = [label for label in graph_labels(layer.experts(experts_input, *routing)) if label not in VIEWS]
    assert [k for k in kernels if not k.startswith("Compiled")] == ["GatherMM", "GatherMM", "Matmul"], kernels
    assert sum(k.startswith("Compiled") for k in kernels) == 1, kernels


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_moe_layer_inputs_equal_their_own_norms_exactly(moe, dtype, monkeypatch):
    """Each of the three inputs has the bits of its own `mx.fast.rms_norm`
    (the router's in float32, with its weight folded into its projection)."""
    layer = moe.language_model.model.layers[0]
    for name in ("pre_feedforward_layernorm", "pre_feedforward_layernorm_2"):
        monkeypatch.setitem(layer[name], "weight", layer[name].weight.astype(dtype))
    stacked = mx.stack([layer.pre_feedforward_layernorm.weight, layer.pre_feedforward_layernorm_2.weight])
    monkeypatch.setitem(layer, "_feed_forward_norm_weights", stacked[:, None, None])
    h = mx.random.normal((1, 4, moe.config.text_config.hidden_size)).astype(dtype)
    dense, experts_input, normed = layer.feed_forward_inputs(h.astype(mx.float32))
    eps = layer.pre_feedforward_layernorm.eps
    assert dense.dtype == dtype and mx.array_equal(dense, mx.fast.rms_norm(h, layer.pre_feedforward_layernorm.weight, eps))
    assert mx.array_equal(experts_input, mx.fast.rms_norm(h, layer.pre_feedforward_layernorm_2.weight, eps))
    router = layer.router
    z = mx.fast.rms_norm(h.astype(mx.float32), router.norm_weight(), eps)
    np.testing.assert_allclose(np.array(router.proj(normed)), np.array(z @ (router.proj.weight / router.norm_weight()).T),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_quantized_embedding_rows_take_one_kernel_and_equal_dequantize_exactly(bits, dtype, monkeypatch):
    """GPU route: a token's embedding is unpacked, scaled by sqrt(hidden) and
    cast in one kernel after the row gathers, with the bits of `mx.dequantize`
    and a multiply, into the table's dtype and into float32."""
    import mlx.nn as nn
    from mlx_gemma4 import quantized

    monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    table = nn.Embedding(300, 256)
    table.weight = mx.random.normal((300, 256)).astype(dtype)
    table = nn.QuantizedEmbedding.from_embedding(table, group_size=64, bits=bits)
    table.__class__ = quantized.QuantizedEmbedding
    ids = mx.array([[3, 299, 0, 17]])
    mx.eval(table.parameters(), ids)
    for out_dtype in (dtype, mx.float32):
        scale = mx.array(5376**0.5, dtype=out_dtype)  # not a power of two: its roundings show
        rows = table.scaled_rows(ids, scale)
        kernels = [label for label in graph_labels(rows) if label not in VIEWS]
        assert kernels.count("Gather") == 3 and len(kernels) == 4 and kernels[-1].startswith("Compiled"), kernels
        expected = nn.QuantizedEmbedding.__call__(table, ids).astype(out_dtype) * scale
        assert rows.dtype == out_dtype and rows.shape == (1, 4, 256) and mx.array_equal(rows, expected)


def test_load_time_fusion_changes_nothing(tiny_checkpoint, monkeypatch):
    """What `fuse` does at load time (fused projections, the stacked norm weights
    it stores, the router's norm weight folded into its projection) gives the
    logits of the model as loaded, whose layers rebuild them every call."""
    ids = mx.array([[5, 9, 14, 3, 8, 21]])
    for variant in ("e2b", "26b"):
        folder = tiny_checkpoint(variant, with_towers=False)
        fused = load_model(folder)
        with monkeypatch.context() as patch:
            patch.setattr(loader, "fuse", lambda model: None)
            plain = load_model(folder)
        layers = [model.language_model.model.layers[0] for model in (fused, plain)]
        assert "qkv_proj" in layers[0].self_attn and "qkv_proj" not in layers[1].self_attn
        if variant == "26b":
            assert layers[0]._feed_forward_norm_weights is not None and layers[1]._feed_forward_norm_weights is None
            assert not mx.array_equal(layers[0].router.proj.weight, layers[1].router.proj.weight)
        # The router's folded weight is rounded once in float32, so not bit-equal.
        np.testing.assert_allclose(np.array(fused.language_model(ids)), np.array(plain.language_model(ids)),
                                   rtol=1e-5, atol=1e-5)


def test_expert_gathers_build_no_index_arrays_per_step(moe):
    layer = moe.language_model.model.layers[0]
    h = mx.ones((1, 1, moe.config.text_config.hidden_size))
    routing = layer.router(h)
    mx.eval(routing)
    labels = graph_labels(layer.experts(h, *routing))
    assert "Arange" not in labels


@pytest.fixture(scope="module")
def e2b_4bit(four_bit):
    return load_model(four_bit("e2b"))


@pytest.fixture(scope="module")
def moe_4bit(four_bit):
    return load_model(four_bit("26b"))


@pytest.mark.parametrize("quantized", [False, True])
def test_sorted_expert_gathers_leave_the_row_indices_to_mlx(moe, moe_4bit, quantized, monkeypatch):
    """MLX marks a gather as sorted by expert only when it has no `lhs_indices`
    (`sorted_indices && !lhs_indices` in its ops.cpp), and only then does Metal
    run the kernel that reads each expert's weights once for all its rows.
    Decode steps (unsorted) keep the constant row indices."""

    model = moe_4bit if quantized else moe
    name = "gather_qmm" if quantized else "gather_mm"
    real, calls = getattr(mx, name), []
    monkeypatch.setattr(mx, name, lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    layer = model.language_model.model.layers[0]
    for tokens, sort in [(1, False), (moe_module._SORT_THRESHOLD, True)]:
        h = mx.random.normal((1, tokens, model.config.text_config.hidden_size))
        routing = layer.router(h)
        on_cpu = layer.experts(h, *routing)
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(precision, "cpu_backend", lambda: False)  # the GPU route
            on_gpu = layer.experts(h, *routing)
        assert len(calls) == 2
        assert all(call["sorted_indices"] == sort and (call["lhs_indices"] is None) == sort for call in calls)
        np.testing.assert_allclose(np.array(on_gpu), np.array(on_cpu), rtol=1e-5, atol=1e-5)


def test_cpu_prefill_dequantizes_once_per_chunk_and_matches_quantized_matmul(e2b_4bit, monkeypatch):
    import mlx.nn as nn
    from mlx_gemma4 import quantized
    from mlx_gemma4.quantized import DEQUANTIZE_MIN_ROWS, QuantizedLinear

    layer = e2b_4bit.language_model.model.layers[0]
    proj = layer.mlp.gate_up_proj
    assert isinstance(proj, QuantizedLinear)
    chunk = mx.random.normal((1, DEQUANTIZE_MIN_ROWS + 5, proj.scales.shape[1] * proj.group_size))
    labels = graph_labels(proj(chunk))
    assert "Matmul" in labels and "QuantizedMatmul" not in labels
    assert "QuantizedMatmul" in graph_labels(proj(chunk[:, :1]))  # decode keeps the packed product
    reference = nn.QuantizedLinear.__call__(proj, chunk)
    assert mx.allclose(proj(chunk), reference, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(quantized, "DEQUANTIZE_MAX_WEIGHTS", proj.weight.shape[1] * 8 * 5)  # 5 rows per block
    assert mx.allclose(proj(chunk), reference, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)  # GPUs multiply packed weights
    assert "QuantizedMatmul" in graph_labels(proj(chunk))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cpu_dequantize_unpacks_bfloat16_scaled_weights_exactly_in_float32(bits):
    """The weights the dequantized prefill multiplies are the float32 values
    quantized_matmul multiplies (mx.dequantize rounds them to bfloat16)."""
    from mlx_gemma4.quantized import dequantize

    packed, scales, biases = mx.quantize(mx.random.normal((48, 256), key=mx.random.key(bits)), group_size=64,
                                         bits=bits)
    scales, biases = scales.astype(mx.bfloat16), biases.astype(mx.bfloat16)
    exact = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=bits)
    for stream in (None, mx.new_stream(mx.cpu)):
        assert mx.array_equal(dequantize(packed, scales, biases, 64, bits, "affine", mx.float32, stream), exact)
    packed_product = mx.quantized_matmul(mx.eye(256), packed, scales, biases, group_size=64, bits=bits)
    assert mx.allclose(packed_product, exact.T, rtol=1e-6, atol=1e-7)


def test_cpu_prefill_streams_the_mlp_through_blocks_of_its_intermediate_width(e2b_4bit, monkeypatch):
    from mlx_gemma4 import quantized
    from mlx_gemma4.kernels import geglu

    streams = (None, mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    mlp = e2b_4bit.language_model.model.layers[0].mlp
    down = mlp.down_proj
    hidden, width = down.weight.shape[0], down.scales.shape[1] * down.group_size
    monkeypatch.setattr(quantized, "DEQUANTIZE_MAX_WEIGHTS", 3 * hidden * down.group_size)  # a group per block
    x = mx.random.normal((1, quantized.DEQUANTIZE_MIN_ROWS + 3, hidden))
    gate, up = mx.split(mlp.gate_up_proj(x), 2, axis=-1)  # the whole [rows, 2 x width] activations
    reference = down(geglu(gate, up))
    labels = graph_labels(mlp(x))
    # Every block after a stream's first adds its share into that stream's sum.
    assert labels.count("AddMM") == width // down.group_size - len(streams)
    assert "Concatenate" not in labels
    assert mx.abs(mlp(x) - reference).max().item() < 1e-5 * mx.abs(reference).max().item()
    assert "AddMM" not in graph_labels(mlp(x[:, :1]))  # decode: packed products
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)
    assert "AddMM" not in graph_labels(mlp(x))


def test_a_sliding_cache_copies_a_chunk_instead_of_viewing_its_buffer():
    """A view would keep alive the whole projection buffer it was cut from."""
    from mlx_gemma4.cache import RotatingKVCache

    def address(a):
        return np.asarray(a).__array_interface__["data"][0]

    projections = mx.random.normal((1, 10, 32, 16))  # [batch, q/k/v heads, positions, head_dim]
    mx.eval(projections)
    cache = RotatingKVCache(window=8)
    cache.update_and_fetch(projections[:, 8:9], projections[:, 9:10])
    mx.eval(cache.keys, cache.values)
    start = address(projections)
    for stored in (cache.keys, cache.values):
        assert not start <= address(stored) < start + projections.nbytes
    assert mx.array_equal(cache.state[0], projections[:, 8:9, -8:])


@pytest.mark.parametrize("positions", [32, 80])  # within the window, and longer than it
def test_a_sliding_cache_is_filled_before_its_chunk_attends(positions):
    """Else the copy into the cache is not something the layer's output needs and
    may run after the whole forward pass, every sliding layer holding its chunk's
    Q|K|V buffers until then (E2B, 10 layers, a 512-token chunk: 128 -> 93 MB)."""
    from mlx_gemma4.cache import RotatingKVCache

    mx.synchronize()
    before = mx.get_active_memory()
    projections = mx.random.normal((1, 64, positions, 256))  # [batch, q/k/v heads, positions, head_dim]
    mx.eval(projections)
    buffer = projections.nbytes
    cache = RotatingKVCache(window=64)
    keys, values = cache.update_and_fetch(projections[:, 62:63], projections[:, 63:64])
    attended = (keys * values).sum()
    del projections, keys, values
    mx.eval(attended)
    mx.synchronize()
    assert mx.get_active_memory() - before < cache.nbytes + buffer // 8


def test_a_sliding_cache_grows_in_steps_up_to_its_window(monkeypatch):
    """A short context holds a buffer its own size (rounded up to `step`), not a
    whole window, and reads the same keys as a cache holding the window at once."""
    from mlx_gemma4.cache import RotatingKVCache

    monkeypatch.setattr(RotatingKVCache, "step", 3)
    growing, whole = RotatingKVCache(window=8), RotatingKVCache(window=8)
    whole.step = 8
    keys = mx.arange(2 * 40 * 4, dtype=mx.float32).reshape(1, 2, 40, 4)  # grows with the position
    sizes = []
    for start, stop in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 13),
                        (13, 14), (14, 25), (25, 26), (26, 27), (27, 35), (35, 36)]:
        chunk = keys[:, :, start:stop]
        fetched = growing.update_and_fetch(chunk, -chunk)
        expected = whole.update_and_fetch(chunk, -chunk)
        for a, b in zip(fetched, expected):
            assert mx.array_equal(a, b)
        # A chunk attends over the 7 keys before it and its own, in order; a
        # decoded token over the last 8 keys, in ring order.
        attended = keys[:, :, max(0, start - 7 if stop - start > 1 else stop - 8):stop]
        in_order = fetched[0] if stop - start > 1 else mx.sort(fetched[0], axis=2)
        assert mx.array_equal(in_order, attended) and mx.array_equal(fetched[1], -fetched[0])
        assert all(mx.array_equal(a, b) for a, b in zip(growing.state, whole.state))
        sizes.append(growing.keys.shape[2])
        assert growing.keys.shape[2] >= min(stop, 8)
    assert sizes[:8] == [3, 3, 6, 6, 6, 8, 8, 8] and set(sizes[8:]) == {8}


def test_dequantizing_prefill_keeps_chunked_prefill_equal_to_token_by_token(e2b_4bit):
    """A 4-bit model: a prompt prefilled in one chunk (dequantized products) and
    token by token (packed products) gives the same next-token logits."""
    text_model = e2b_4bit.language_model
    ids = mx.array(np.arange(3, 3 + 80, dtype=np.int32)[None])
    whole = text_model(ids)[:, -1]
    cache = text_model.make_cache()
    for t in range(ids.shape[1]):
        stepped = text_model(ids[:, t:t + 1], cache)[:, -1]
    scale = mx.abs(whole).max().item()
    assert mx.abs(whole - stepped).max().item() / scale < 1e-4


def test_cpu_decode_copies_the_chosen_experts_and_matches_gather_qmm(moe_4bit, monkeypatch):
    layer = moe_4bit.language_model.model.layers[0]
    proj = layer.experts.switch_glu.down_proj
    assert "scales" in proj
    x = mx.random.normal((1, 1, 1, 1, proj.scales.shape[-1] * proj.group_size))
    indices = mx.array([[[0, 3]]], dtype=mx.uint32)
    labels = graph_labels(proj(x, indices, sorted_indices=False))
    assert "GatherQMM" not in labels and "QuantizedMatmul" in labels
    reference = mx.gather_qmm(x, proj.weight, proj.scales, proj.get("biases"), rhs_indices=indices,
                              transpose=True, group_size=proj.group_size, bits=proj.bits)
    assert mx.array_equal(proj(x, indices, sorted_indices=False), reference)
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)  # the GPU route gathers in the kernel
    assert "GatherQMM" in graph_labels(proj(x, indices, sorted_indices=False))
    assert mx.array_equal(proj(x, indices, sorted_indices=False), reference)


def test_cpu_products_are_shared_out_over_one_stream_per_core(e2b_4bit, moe_4bit, monkeypatch):
    """Each CPU stream has its own thread: packed products, the tied LM head and
    the expert gathers are split over them, with results equal to one kernel's."""
    import mlx.nn as nn
    from mlx_gemma4 import quantized

    streams = (None, mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    monkeypatch.setattr(quantized, "MIN_WEIGHTS_PER_PART", 1)
    proj = e2b_4bit.language_model.model.layers[0].mlp.gate_up_proj
    x = mx.random.normal((1, 1, proj.scales.shape[1] * proj.group_size))
    assert graph_labels(proj(x)).count("QuantizedMatmul") == len(streams)
    assert mx.array_equal(proj(x), nn.QuantizedLinear.__call__(proj, x))
    head = e2b_4bit.language_model.model.embed_tokens
    assert isinstance(head, quantized.QuantizedEmbedding)
    assert graph_labels(head.as_linear(x)).count("QuantizedMatmul") == len(streams)
    assert mx.array_equal(head.as_linear(x), nn.QuantizedEmbedding.as_linear(head, x))
    # The LM head, much the largest matrix, takes smaller parts (each casts its scales).
    vocab, hidden = head.weight.shape[0], x.shape[-1]
    monkeypatch.setattr(quantized, "MAX_LM_HEAD_PART", 16 * hidden)
    assert graph_labels(head.as_linear(x)).count("QuantizedMatmul") == -(-vocab // 16) > len(streams)
    assert mx.array_equal(head.as_linear(x), nn.QuantizedEmbedding.as_linear(head, x))

    # Many tokens: each projection in blocks of output columns dealt out to the streams, every gather given its
    # block's scales and biases already in the activations' dtype (MLX's CPU gather casts whole stacks otherwise).
    layer = moe_4bit.language_model.model.layers[0]
    glu = layer.experts.switch_glu
    h = mx.random.normal((1, moe_module._SORT_THRESHOLD, moe_4bit.config.text_config.hidden_size))
    routing = layer.router(h)
    on_cpu = layer.experts(h, *routing)
    with monkeypatch.context() as patch:
        patch.setattr(precision, "cpu_backend", lambda: False)  # one gather per projection
        np.testing.assert_allclose(np.array(layer.experts(h, *routing)), np.array(on_cpu), rtol=1e-5, atol=1e-5)
    column_bytes = 2 * glu.down_proj.scales.shape[0] * glu.down_proj.scales.shape[-1] * 4  # float32 scales, biases
    monkeypatch.setattr(moe_module, "_BLOCK_BYTES", 3 * column_bytes)  # the down projection: 3 columns a block
    gathers, real_gather = [], mx.gather_qmm

    def gather(x, w, scales, biases, **kwargs):
        assert scales.dtype == biases.dtype == x.dtype
        gathers.append((w.shape[1], str(mx.default_stream(mx.cpu))))
        return real_gather(x, w, scales, biases, **kwargs)

    monkeypatch.setattr(mx, "gather_qmm", gather)
    hidden, width = glu.down_proj.weight.shape[1], glu.gate_up_proj.weight.shape[1] // 2

    def check_blocks():
        gathers.clear()
        np.testing.assert_allclose(np.array(layer.experts(h, *routing)), np.array(on_cpu), rtol=1e-6, atol=1e-6)
        down = gathers[-math.ceil(hidden / 3):]
        assert sum(columns for columns, _ in down) == hidden and max(columns for columns, _ in down) <= 3
        assert sum(columns for columns, _ in gathers[:-len(down)]) == 2 * width
        assert len({stream for _, stream in gathers}) == len(streams)

    check_blocks()
    fused = glu.gate_up_proj  # gate and up left unfused (as when their quantization differs): the same blocks
    halves = [copy.copy(fused), copy.copy(fused)]
    for i, half in enumerate(halves):
        for name in ("weight", "scales", "biases"):
            half[name] = fused[name][:, i * width:(i + 1) * width]
    try:
        delattr(glu, "gate_up_proj")
        glu.gate_proj, glu.up_proj = halves
        check_blocks()
    finally:
        delattr(glu, "gate_proj"), delattr(glu, "up_proj")
        glu.gate_up_proj = fused
    monkeypatch.setattr(mx, "gather_qmm", real_gather)

    experts = layer.experts.switch_glu.gate_up_proj
    rows = 7
    x = mx.random.normal((rows, 1, experts.scales.shape[-1] * experts.group_size))
    indices = mx.sort(mx.random.randint(0, experts.weight.shape[0], (rows,)).astype(mx.uint32))
    token, chosen = x[None, :1], indices[None, :len(streams)]  # one token, unsorted: copied experts
    products, real_product = [], mx.quantized_matmul

    def product(x, w, *args, **kwargs):
        products.append((w.shape[-2], str(mx.default_stream(mx.cpu))))
        return real_product(x, w, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", product)
    out = experts(token, chosen, sorted_indices=False)
    assert "GatherQMM" not in graph_labels(out)
    # A block of columns at a time, every stream used, all columns once.
    assert len(products) > len(streams) and len({stream for _, stream in products}) == len(streams)
    assert sum(columns for columns, _ in products) == experts.weight.shape[1]
    reference = mx.gather_qmm(token, experts.weight, experts.scales, experts.get("biases"), rhs_indices=chosen,
                              transpose=True, group_size=experts.group_size, bits=experts.bits)
    assert mx.array_equal(out, reference)


@pytest.mark.parametrize("kv_heads, n_streams", [(1, 2), (2, 2), (1, 3), (1, 6)])
def test_cpu_decode_over_a_long_cache_splits_attention_heads_over_the_streams(kv_heads, n_streams, monkeypatch):
    """Query heads in groups of near-equal size, at most one stream per head
    (3 or 6 streams for 4 heads: 3 or 4 groups)."""
    from mlx_gemma4 import attention

    streams = (None,) + tuple(mx.new_stream(mx.cpu) for _ in range(n_streams - 1))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    keys = attention.SPLIT_ATTENTION_MIN_SCORES + 3
    q = mx.random.normal((1, 4, 1, 16))
    k, v = mx.random.normal((1, kv_heads, keys, 16)), mx.random.normal((1, kv_heads, keys, 16))
    reference = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
    calls = _count_calls(monkeypatch, mx.fast, "scaled_dot_product_attention")
    assert graph_labels(attention.attend(q, k, v, None)).count("Concatenate") == 1
    assert len(calls) == min(n_streams, q.shape[1])
    assert mx.allclose(attention.attend(q, k, v, None), reference, rtol=1e-6, atol=1e-6)
    short = (k[:, :, :8], v[:, :, :8])
    assert "Concatenate" not in graph_labels(attention.attend(q, *short, None))
    monkeypatch.setattr(precision, "cpu_backend", lambda: False)  # a GPU neither splits nor makes CPU streams
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: pytest.fail("CPU streams made on a GPU"))
    assert "Concatenate" not in graph_labels(attention.attend(q, k, v, None))


def _random_4bit_experts() -> "moe_module.Experts":
    """A 64-expert layer (hidden 1024, intermediate 512), 4-bit, gate and up fused as the loader fuses them."""
    import mlx.nn as nn
    from types import SimpleNamespace
    from mlx_gemma4.fusion import concat_outputs

    experts = moe_module.Experts(SimpleNamespace(hidden_size=1024, moe_intermediate_size=512, num_experts=64))
    glu = experts.switch_glu
    for proj in glu.children().values():
        proj.weight = mx.random.normal(proj.weight.shape, key=mx.random.key(0)).astype(mx.bfloat16)
    nn.quantize(experts, group_size=64, bits=4)
    glu.gate_up_proj = concat_outputs([glu.gate_proj, glu.up_proj])
    delattr(glu, "gate_proj"), delattr(glu, "up_proj")
    mx.eval(experts.parameters())
    return experts


def _peak_above_held(compute):
    """`compute()` evaluated, and the peak memory it took above what was held before it."""
    mx.synchronize()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    out = compute()
    mx.eval(out)
    streams_module.synchronize()
    return out, mx.get_peak_memory() - held


def test_cpu_prefill_experts_peak_well_below_one_cast_of_their_scales(monkeypatch):
    """MLX's CPU gather casts the scales and biases it is given to the activations' dtype: whole stacks, 95 MB
    per 26B-A4B layer, made its prefill peak above mlx-vlm's. Cast a block of columns at a time, many tokens'
    experts peak far below one whole cast (it was 1.4x one cast here)."""
    experts = _random_4bit_experts()
    glu = experts.switch_glu
    x = mx.random.normal((1, 64, 1024), key=mx.random.key(1))
    chosen = mx.argpartition(mx.random.normal((1, 64, 64), key=mx.random.key(2)), kth=-8, axis=-1)[..., -8:]
    weights = mx.softmax(mx.random.normal(chosen.shape, key=mx.random.key(3)), axis=-1)
    mx.eval(x, chosen, weights)
    whole_cast = sum(proj[name].nbytes * 2 for proj in glu.children().values() for name in ("scales", "biases"))
    monkeypatch.setattr(moe_module, "_BLOCK_BYTES", 1 << 16)  # 64 blocks a projection, as 26B-A4B has
    _, peak = _peak_above_held(lambda: experts(x, chosen, weights, mx.ones_like(weights)))
    assert peak < whole_cast / 2


def test_cpu_decode_experts_peak_well_below_one_copy_of_them(monkeypatch):
    """A decode step copies its chosen experts out on the CPU (MLX's CPU gather casts whole stacks of scales): a
    block of columns at a time, the copies in flight stay far below one whole copy of them (0.26x here; copied
    whole, 1.25x)."""
    experts = _random_4bit_experts()
    glu = experts.switch_glu
    x = mx.random.normal((1, 1, 1024), key=mx.random.key(1))
    chosen = mx.array([[[3, 9, 17, 20, 33, 41, 50, 63]]], dtype=mx.uint32)
    weights = mx.full(chosen.shape, 1 / 8)
    mx.eval(x, chosen, weights)
    one_copy = sum(proj[name].nbytes * 8 // 64 for proj in glu.children().values()
                   for name in ("weight", "scales", "biases"))
    monkeypatch.setattr(moe_module, "_BLOCK_BYTES", 1 << 16)
    out, peak = _peak_above_held(lambda: experts(x, chosen, weights, mx.ones_like(weights)))
    assert peak < one_copy / 2
    with monkeypatch.context() as patch:
        patch.setattr(precision, "cpu_backend", lambda: False)  # the gather kernel
        np.testing.assert_allclose(np.array(experts(x, chosen, weights, mx.ones_like(weights))), np.array(out),
                                   rtol=1e-5, atol=1e-5)


def test_cpu_experts_are_copied_out_for_one_token_only(moe_4bit, monkeypatch):
    """On the CPU a decode step copies its k chosen experts out for `quantized_matmul`; from two tokens on (a short
    prompt, a speculative verification) the column blocks hold no per-token copies (one 26B-A4B layer, 6 tokens:
    107 vs 121 ms, 10 vs 21 MB)."""
    layer = moe_4bit.language_model.model.layers[0]
    blocks, real_prefill = [], moe_module.Experts.cpu_prefill
    monkeypatch.setattr(moe_module.Experts, "cpu_prefill",
                        lambda self, *args: blocks.append(len(args)) or real_prefill(self, *args))
    for tokens in (1, 2):
        h = mx.random.normal((1, tokens, moe_4bit.config.text_config.hidden_size))
        routing = layer.router(h)
        blocks.clear()
        on_cpu = layer.experts(h, *routing)
        assert len(blocks) == (tokens > 1)
        with monkeypatch.context() as patch:
            patch.setattr(precision, "cpu_backend", lambda: False)
            np.testing.assert_allclose(np.array(layer.experts(h, *routing)), np.array(on_cpu), rtol=1e-5, atol=1e-5)


def test_cpu_prefill_experts_start_after_the_dense_mlp(moe_4bit, monkeypatch):
    """On the CPU an MoE layer's experts wait for its dense MLP: the two branches' blocks interleaved on the
    streams left a stream idle behind the other's MLP work (one 26B-A4B layer: 5.1 s against 4.1 s)."""
    from mlx_gemma4.mlp import MLP

    dense, afters, depends = [], [], []
    real_mlp, real_prefill, real_depends = MLP.__call__, moe_module.Experts.cpu_prefill, mx.depends
    monkeypatch.setattr(MLP, "__call__", lambda self, x: dense.append(real_mlp(self, x)) or dense[-1])
    monkeypatch.setattr(moe_module.Experts, "cpu_prefill",
                        lambda self, x, e, w, after=None: afters.append(after) or real_prefill(self, x, e, w, after))
    monkeypatch.setattr(mx, "depends", lambda inputs, deps: depends.append(deps) or real_depends(inputs, deps))
    mx.eval(moe_4bit(mx.arange(4, 4 + moe_module._SORT_THRESHOLD)[None], moe_4bit.make_cache()))
    assert len(afters) == len(dense) == len(moe_4bit.language_model.model.layers)
    assert all(after is output for after, output in zip(afters, dense))
    assert all(any(len(deps) == 1 and deps[0] is after for deps in depends) for after in afters)


def test_cpu_prefill_and_image_attention_split_heads_over_the_streams(monkeypatch):
    """Prefill chunks and image patches (many queries) split their heads too,
    with any mask that does not vary by head; a per-head mask is not split."""
    from mlx_gemma4 import attention

    streams = (None, mx.new_stream(mx.cpu))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    q, k, v = (mx.random.normal((2, 4, 40, 16)) for _ in range(3))
    assert 40 * 40 >= attention.SPLIT_ATTENTION_MIN_SCORES
    padding = mx.arange(40) < mx.array([40, 31])[:, None]  # the second image's last 9 patches are padding
    per_head = mx.broadcast_to(mx.tril(mx.ones((40, 40), dtype=mx.bool_)), (2, 4, 40, 40))
    for mask, splits in ((None, True), ("causal", True), (mx.tril(mx.ones((40, 40), dtype=mx.bool_)), True),
                         (padding[:, None, None, :], True), (per_head, False)):
        reference = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        out = attention.attend(q, k, v, mask)
        assert ("Concatenate" in graph_labels(out)) == splits
        assert mx.allclose(out, reference, rtol=1e-6, atol=1e-6)


def test_cpu_image_attention_is_computed_block_by_block_of_queries(monkeypatch):
    """A large image's attention on the CPU runs one block of queries at a time,
    each evaluated before the next is built (so only one block's scores exist),
    with every block reading all keys: the same output as one call."""
    from mlx_gemma4 import vision

    attention_layer = vision.VisionAttention(vision.VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, patch_size=16, position_embedding_size=64, pooling_kernel_size=3, rms_norm_eps=1e-6,
        use_clipped_linears=False, standardize=False, rope_theta=100.0))
    patches = 40
    x = mx.random.normal((2, patches, 32), key=mx.random.key(3))
    positions = mx.stack([mx.arange(patches) % 8, mx.arange(patches) // 8], axis=-1).astype(mx.float32)
    angles = mx.broadcast_to(positions[..., None] * mx.linspace(0.1, 1.0, 4), (2, patches, 2, 4))  # any will do
    cos, sin = mx.cos(angles), mx.sin(angles)
    mask = (mx.arange(patches) < mx.array([patches, 31])[:, None])[:, None, None, :]  # padding in the second
    whole = attention_layer(x, cos, sin, mask)
    evaluated = []
    monkeypatch.setattr(vision, "CPU_QUERY_BLOCK", 16)
    evaluate = mx.eval
    monkeypatch.setattr(vision.mx, "eval", lambda *a: evaluated.append(a) or evaluate(*a))
    blocks = attention_layer(x, cos, sin, mask)
    assert len(evaluated) == 3  # 16 + 16 + 8 queries
    assert mx.allclose(blocks, whole, rtol=1e-6, atol=1e-6).item()


def test_cpu_float_products_are_shared_out_over_the_streams(e2b, tiny_checkpoint, monkeypatch):
    """Unquantized layers (float checkpoints, the vision and audio towers) split
    their products by output columns over the CPU streams; small ones do not."""
    import mlx.nn as nn
    from mlx_gemma4 import quantized

    model = load_model(tiny_checkpoint("e2b"))
    routed = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert routed and all(type(m) in (quantized.Linear, quantized.Embedding) for m in routed)
    assert any(type(m) is quantized.Linear for _, m in model.vision_tower.named_modules())

    streams = (None, mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    monkeypatch.setattr(streams_module, "cpu_streams", lambda: streams)
    proj = e2b.language_model.model.layers[0].mlp.gate_up_proj
    head = e2b.language_model.model.embed_tokens
    x = mx.random.normal((1, 5, proj.weight.shape[1]))
    assert "Concatenate" not in graph_labels(proj(x))  # too small to gain from a split
    monkeypatch.setattr(quantized, "MIN_WEIGHTS_PER_PART", 1)
    for out, reference in ((proj(x), nn.Linear.__call__(proj, x)), (head.as_linear(x), x @ head.weight.T)):
        assert graph_labels(out).count("Matmul") == len(streams)
        assert mx.allclose(out, reference, rtol=1e-6, atol=1e-6)


def test_models_without_load_time_fusion_train_the_weights_behind_it(tiny_checkpoint, monkeypatch):
    """Without `fuse` (models built by hand, as in benchmarks/train_small.py),
    the stacked and folded weights are rebuilt every call, so gradients reach
    the q/k norm weights, the feed-forward norms and the router's scale."""
    import mlx.nn as nn

    monkeypatch.setattr(loader, "fuse", lambda model: None)
    model = load_model(tiny_checkpoint("26b", with_towers=False)).language_model
    ids = mx.array([[3, 7, 11, 5]])

    def loss(m):
        return nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    layer = grads["model"]["layers"][0]
    for g in (layer["self_attn"]["q_norm"]["weight"], layer["self_attn"]["k_norm"]["weight"], layer["router"]["scale"],
              layer["pre_feedforward_layernorm"]["weight"], layer["pre_feedforward_layernorm_2"]["weight"]):
        assert mx.abs(g).max().item() > 0


def test_loading_peaks_at_the_loaded_weights(four_bit):
    """Fusion and casts make new tensors from the stored ones; evaluating them
    one at a time, with nothing else holding the stored ones, keeps the load
    peak at the size of what is loaded (it was 1.46x on this checkpoint)."""

    out = four_bit("26b", "bfloat16")
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_model(out)
    loaded = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert mx.get_peak_memory() - before < 1.1 * loaded
