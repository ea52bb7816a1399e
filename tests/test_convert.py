"""The converter (`python -m mlx_gemma4.convert`, package `convert`) on tiny random checkpoints."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma4
from convert import ConvertError, convert, upload
from mlx_gemma4.generate import generate_tokens
from mlx_gemma4.loader import load_model

REPO = Path(__file__).resolve().parents[1]
IDS = mx.array([[2, 10, 20, 30, 40, 50, 60, 70]])
QUIET = {"progress": False, "log": lambda *_: None}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma4.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def tensors(folder: Path) -> dict:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(mx.load(str(shard)))
    return out


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".converting-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """Factory: (variant, bits, **options) → (output folder, result), converted once per module."""
    done = {}

    def get(variant, bits, **options):
        key = (variant, bits, tuple(sorted(options.items())))
        if key not in done:
            out = tmp_path_factory.mktemp("converted") / f"{variant}-{bits}"
            result = convert(tiny_checkpoint(variant), out, quantize=True, q_bits=bits, q_group_size=32,
                             **options, **QUIET)
            done[key] = out, result
        return done[key]

    return get


@pytest.mark.parametrize("variant", ["e2b", "e4b", "26b", "31b"])
def test_every_variant_converts_loads_and_generates(converted, variant):
    reports = {}
    for bits in (4, 8):
        out, result = converted(variant, bits)
        model, processor = mlx_gemma4.load(out)
        tokens = generate_tokens(model, mx.array(processor.encode("hello world", add_special_tokens=True)))
        assert len([next(tokens) for _ in range(4)]) == 4
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
        assert config["quantization_config"] == config["quantization"]
        assert json.loads((out / "quality.json").read_text()) == result.quality
        assert "## Quality" in (out / "README.md").read_text()
        reports[bits] = result.quality
    for q in reports.values():
        assert 0 < q["mean_kl"] < math.inf and 0 <= q["top1_agreement_pct"] <= 100
    assert reports[8]["top1_agreement_pct"] >= reports[4]["top1_agreement_pct"]
    assert reports[8]["mean_kl"] < reports[4]["mean_kl"]
    assert reports[4]["disk_bytes"] < reports[8]["disk_bytes"] < reports[8]["reference_disk_bytes"]


def test_per_tensor_decisions_and_towers_carried_unchanged(tiny_checkpoint, converted):
    out, _ = converted("26b", 4)
    got = tensors(out)
    # Expert stacks are quantized whole: [experts, out, packed in] with per-expert scales.
    gate = "language_model.model.layers.0.experts.switch_glu.gate_proj"
    assert got[f"{gate}.weight"].dtype == mx.uint32 and got[f"{gate}.scales"].ndim == 3
    assert "language_model.model.layers.0.router.proj.scales" not in got
    assert got["language_model.model.layers.0.router.proj.weight"].dtype == mx.float32
    assert "language_model.model.layers.0.mlp.gate_proj.scales" in got
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["language_model.model.embed_tokens"]["bits"] == 8
    source = tensors(tiny_checkpoint("26b"))
    prefixes = ("model.vision_tower.", "model.embed_vision.")
    towers = {k[len("model."):]: v for k, v in source.items() if k.startswith(prefixes)}
    assert towers
    for name, value in towers.items():
        assert name in got and got[name].dtype == value.dtype
        np.testing.assert_array_equal(np.array(got[name]), np.array(value))
    assert not [k for k in got if k.startswith(("vision_tower.", "embed_vision.")) and k.endswith(".scales")]


def test_ple_table_stays_8bit_and_float16_never_reaches_the_towers(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert(tiny_checkpoint("e4b"), out, quantize=True, q_bits=4, q_group_size=32, dtype="float16",
            report=False, **QUIET)
    got = tensors(out)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    eight_bit = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert quantization["language_model.model.embed_tokens_per_layer"] == eight_bit
    assert got["language_model.model.layers.0.mlp.up_proj.scales"].dtype == mx.float16
    tower_dtypes = {v.dtype for k, v in got.items() if k.startswith(("vision_tower.", "audio_tower.", "embed_"))}
    assert tower_dtypes == {mx.float32}


@pytest.mark.parametrize("variant,options", [("e2b", {"recipe": "mixed"}), ("26b", {"recipe": "mixed"}),
                                             ("e2b", {})])
def test_output_loads_in_mlx_vlm_with_the_same_logits(converted, variant, options):
    from mlx_vlm.utils import load_model as load_with_mlx_vlm

    out, _ = converted(variant, 4, **options)
    ours = np.array(load_model(out)(IDS))
    theirs = np.array(load_with_mlx_vlm(out).language_model(IDS).logits)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(ours).max())


def test_mixed_recipe_keeps_moe_dense_mlp_and_ple_at_8bit(converted):
    out, _ = converted("26b", 4, recipe="mixed")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["language_model.model.layers.3.mlp.up_proj"]["bits"] == 8
    assert "language_model.model.layers.3.self_attn.q_proj" not in quantization
    out, _ = converted("e2b", 4, recipe="mixed")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["language_model.model.layers.0.per_layer_input_gate"]["bits"] == 8


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_float_formats(tiny_checkpoint, tmp_path, mode):
    out = tmp_path / mode
    result = convert(tiny_checkpoint("31b"), out, quantize=True, q_mode=mode, **QUIET)
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    assert result.suggested_repo.endswith(f"-{mode}")
    assert 0 < result.quality["mean_kl"] < math.inf


def test_small_shards_and_index(tiny_checkpoint, converted, tmp_path):
    whole, _ = converted("e2b", 8)
    out = tmp_path / "sharded"
    convert(tiny_checkpoint("e2b"), out, quantize=True, q_bits=8, q_group_size=32, max_shard_size="100KB",
            report=False, **QUIET)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in shards:
        names = set(mx.load(str(shard)))
        assert names == {k for k, f in index["weight_map"].items() if f == shard.name}
        # A shard overflows the limit only by its header and by one module group.
        assert sum(v.nbytes for v in mx.load(str(shard)).values()) <= 100_000 or len(names) <= 3
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors(out).values())
    np.testing.assert_array_equal(np.array(load_model(out)(IDS)), np.array(load_model(whole)(IDS)))


def test_requantizing_an_mlx_checkpoint(converted, tmp_path):
    source, _ = converted("26b", 8)
    out = tmp_path / "requantized"
    result = convert(source, out, quantize=True, q_bits=4, q_group_size=64, **QUIET)
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 64
    assert 0 < result.quality["mean_kl"] < math.inf
    # Dequantizing (no -q) gives a float checkpoint with the same logits as the quantized input.
    floats = tmp_path / "float"
    convert(source, floats, report=False, **QUIET)
    assert "quantization" not in json.loads((floats / "config.json").read_text())
    assert not [k for k in tensors(floats) if k.endswith(".scales")]
    np.testing.assert_allclose(np.array(load_model(floats)(IDS)), np.array(load_model(source)(IDS)), atol=1e-3)


class RecordingHub:
    """Stands in for huggingface_hub.HfApi; records calls, touches no network."""

    def __init__(self, token="hf_test"):
        self.token, self.calls = token, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/me/model/commit/0"


def test_upload_through_an_injected_hub_api(converted, monkeypatch):
    out, _ = converted("e2b", 4)
    hub = RecordingHub()
    assert upload(out, "me/model", api=hub).endswith("commit/0")
    assert [c[:2] for c in hub.calls] == [("create_repo", "me/model"), ("upload_folder", "me/model")]
    assert hub.calls[1][2]["folder_path"] == str(out)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConvertError, match="no Hugging Face token"):
        upload(out, "me/model", api=RecordingHub(token=None))


def test_convert_then_upload_and_no_token_fails_before_converting(tiny_checkpoint, tmp_path, monkeypatch):
    hub = RecordingHub()
    result = convert(tiny_checkpoint("31b"), tmp_path / "out", quantize=True, q_group_size=32, report=False,
                     upload_repo="me/tiny-4bit", hub_api=hub, **QUIET)
    assert result.uploaded_to and [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert "me/tiny-4bit" in (tmp_path / "out" / "README.md").read_text()
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConvertError, match="no Hugging Face token"):
        convert(tiny_checkpoint("31b"), tmp_path / "out2", quantize=True, upload_repo="me/x",
                hub_api=RecordingHub(token=None), **QUIET)
    assert not (tmp_path / "out2").exists()


def test_dry_run_lists_files_card_and_repo_name(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = run_cli("--hf-path", tiny_checkpoint("e2b"), "--mlx-path", out, "-q", "--q-group-size", "32", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "suggested repo name: mlx-community/gemma-4-e2b-" in done.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert f"  {name}  " in done.stdout
    assert "library_name: mlx" in done.stdout and "top-1 agreement" in done.stdout


def _unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _missing_shard(folder):
    sorted(folder.glob("*.safetensors"))[1].unlink()


def _truncated_shard(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


@pytest.mark.parametrize("damage,message", [
    (_unknown_model_type, "model_type 'llama' is not supported"),
    (_missing_shard, "shard.* missing"),
    (_truncated_shard, "truncated"),
])
def test_bad_input_checkpoint(tiny_checkpoint, tmp_path, damage, message):
    folder = shutil.copytree(tiny_checkpoint("e2b", max_shard_size="200KB"), tmp_path / "in")
    damage(folder)
    done = run_cli("--hf-path", folder, "--mlx-path", tmp_path / "out", "-q")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and re.search(message, done.stderr)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("options,message", [
    ({"q_bits": 3}, "3-bit is not supported by recipe 'default'"),
    ({"q_bits": 4, "q_group_size": 64}, r"group size 64 does not divide the input dimension 96 of "
                                        r"language_model.model.embed_tokens_per_layer.weight"),
    ({"q_mode": "mxfp4", "q_bits": 8}, "mxfp4 is 4-bit"),
    ({"recipe": "nope"}, "unknown recipe"),
])
def test_bad_options(tiny_checkpoint, tmp_path, options, message):
    with pytest.raises(ConvertError, match=message):
        convert(tiny_checkpoint("e4b"), tmp_path / "out", quantize=True, **options, **QUIET)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_three_bits_with_a_recipe_that_allows_it(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("31b"), tmp_path / "out", quantize=True, q_bits=3, q_group_size=32, recipe="mixed",
            report=False, **QUIET)
    assert load_model(tmp_path / "out")(IDS).shape[-1] > 0


def test_existing_output_is_refused_unless_forced(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli("--hf-path", tiny_checkpoint("31b"), "--mlx-path", out, "-q")
    assert done.returncode == 2 and "already exists; pass --force" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny_checkpoint("31b"), out, force=True, report=False, **QUIET)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file() and not leftovers(tmp_path)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(mx, "save_safetensors", fail)
    expected = ConvertError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="No space left on device" if expected is ConvertError else None):
        convert(tiny_checkpoint("31b"), tmp_path / "out", quantize=True, q_group_size=32, **QUIET)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_converter_imports_no_torch_transformers_or_mlx_lm():
    code = ("import sys, mlx_gemma4.convert, convert.cli;"
            "bad = [m for m in ('torch', 'transformers', 'mlx_lm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
