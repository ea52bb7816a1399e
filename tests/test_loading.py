"""Loading checkpoints in every layout, and a clear one-line error for every bad input."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma4
from mlx_gemma4 import CheckpointError
from mlx_gemma4.loader import load_model

IDS = np.array([[2, 10, 20, 30, 40, 50, 60, 70]], dtype=np.int32)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


@pytest.fixture(scope="module")
def e2b(tiny_checkpoint):
    return tiny_checkpoint("e2b")


@pytest.fixture(scope="module")
def e2b_logits(e2b):
    return logits(load_model(e2b))


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_returns_model_and_processor(e2b, e2b_logits):
    model, processor = mlx_gemma4.load(str(e2b))
    np.testing.assert_array_equal(logits(model), e2b_logits)
    assert processor.encode("hello world")


def test_sharded_checkpoint_loads_identically(tiny_checkpoint, e2b_logits):
    sharded = tiny_checkpoint("e2b", max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(logits(load_model(sharded)), e2b_logits)


def test_text_only_checkpoint_and_text_only_load(tiny_checkpoint, e2b, e2b_logits):
    np.testing.assert_array_equal(logits(load_model(e2b, text_only=True)), e2b_logits)
    stripped = tiny_checkpoint("e2b", with_towers=False)
    assert logits(load_model(stripped)).shape == e2b_logits.shape


def test_lazy_load_gives_the_same_logits(e2b, e2b_logits):
    np.testing.assert_array_equal(logits(load_model(e2b, lazy=True)), e2b_logits)


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_checkpoint_converted_by_mlx_vlm(tiny_checkpoint, tmp_path, variant):
    """mlx-vlm's converter writes the mlx-community layout (split expert stacks,
    4-bit QuantizedLinear/Embedding, per-layer overrides); we run it exactly as
    mlx-vlm itself does."""
    from mlx_vlm import convert
    from mlx_vlm.utils import load_model as load_with_mlx_vlm

    out = tmp_path / "mlx"
    convert(str(tiny_checkpoint(variant)), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=4,
            trust_remote_code=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    got = logits(load_model(out))
    reference = load_with_mlx_vlm(out).language_model(mx.array(IDS)).logits
    np.testing.assert_allclose(got, np.array(reference), rtol=0, atol=1e-4 * np.abs(got).max())


def test_hub_repo_id_resolves_from_local_cache(e2b, e2b_logits, tmp_path):
    """A repo id goes through huggingface_hub; offline, its cache serves it.
    (huggingface_hub reads HF_HUB_* at import, hence a fresh process.)"""
    commit = "0" * 40
    repo_dir = tmp_path / "hub" / "models--mlx-community--tiny-gemma4-test"
    copy_checkpoint(e2b, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys, numpy as np, mlx.core as mx, mlx_gemma4;"
        "model, _ = mlx_gemma4.load('mlx-community/tiny-gemma4-test');"
        "np.save(sys.argv[1], np.array(model(mx.array(%r))))" % IDS.tolist()
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.npy")], env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), e2b_logits)
    missing = subprocess.run(
        [sys.executable, "-c", "import mlx_gemma4; mlx_gemma4.load('mlx-community/not-in-the-cache')"],
        env=env, capture_output=True, text=True,
    )
    assert missing.returncode != 0 and "could not get this Hub repo" in missing.stderr


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def first_shard(folder):
    return sorted(folder.glob("*.safetensors"))[0]


def rewrite_tensor(folder, mutate):
    shard = first_shard(folder)
    tensors = mx.load(str(shard))
    mutate(tensors)
    mx.save_safetensors(str(shard), tensors)


def _missing_config(p):
    (p / "config.json").unlink()


def _other_model_type(p):
    edit_config(p, lambda c: c.update(model_type="llama"))


def _unified_model_type(p):
    edit_config(p, lambda c: c.update(model_type="gemma4_unified"))


def _missing_tensor(p):
    rewrite_tensor(p, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))


def _wrong_shape(p):
    def mutate(t):
        key = "model.language_model.layers.1.mlp.up_proj.weight"
        t[key] = t[key][:-1]
    rewrite_tensor(p, mutate)


def _truncated(p):
    shard = first_shard(p)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _corrupt_header(p):
    shard = first_shard(p)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32
    shard.write_bytes(bytes(data))


def _bad_layer_types(p):
    edit_config(p, lambda c: c["text_config"]["layer_types"].pop())


def _too_many_experts(p):
    edit_config(p, lambda c: c["text_config"].update(enable_moe_block=True, num_experts=2, top_k_experts=4,
                                                     moe_intermediate_size=8))


def _missing_field(p):
    edit_config(p, lambda c: c["text_config"].pop("hidden_size"))


def _bad_json(p):
    (p / "config.json").write_text("{not json")


BAD_INPUTS = [
    (_missing_config, "no config.json"),
    (_other_model_type, "model_type 'llama' is not supported; supported: gemma4, gemma4_text"),
    (_unified_model_type, "model_type 'gemma4_unified' is not supported"),
    (_missing_tensor, "missing tensor language_model.model.layers.1.mlp.up_proj.weight"),
    (_wrong_shape, r"layers.1.mlp.up_proj.weight has shape \(\d+, 64\) but the config implies"),
    (_truncated, "truncated"),
    (_corrupt_header, "corrupt safetensors header"),
    (_bad_layer_types, "layer_types has 9 entries but num_hidden_layers is 10"),
    (_too_many_experts, "top_k_experts=4 exceeds num_experts=2"),
    (_missing_field, "missing required field.*hidden_size"),
    (_bad_json, "not valid JSON"),
]


@pytest.mark.parametrize("damage,message", BAD_INPUTS, ids=[d.__name__ for d, _ in BAD_INPUTS])
def test_bad_checkpoint_gives_clear_error(e2b, tmp_path, damage, message):
    folder = copy_checkpoint(e2b, tmp_path / "ckpt")
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as info:
        mlx_gemma4.load(str(folder))
    assert "\n" not in str(info.value)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        mlx_gemma4.load(str(tmp_path / "nowhere"))


def test_loading_never_unpickles(e2b, tmp_path):
    """A pickle file in the folder is ignored, not executed."""
    folder = copy_checkpoint(e2b, tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04crm\n-rf\n.")  # would fail loudly if unpickled
    load_model(folder)


def test_runtime_does_not_import_torch_or_transformers(e2b):
    code = (
        "import sys, mlx_gemma4; mlx_gemma4.load(sys.argv[1]);"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(e2b)], check=True)
