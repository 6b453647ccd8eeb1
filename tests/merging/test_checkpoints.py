"""Streamed interpolation of checkpoint folders: formats, sharding, Hub ids, checks and atomic writes."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_ext.merging.checkpoints as checkpoints
from hf_ext.merging import interpolate_checkpoints, interpolate_models, interpolate_state_dict
from hf_ext.testing import lay_out_as_hub_repo, tiny_gpt2, tiny_llama


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder, single file or sharded."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """base (sharded, with an index) and tuned (one file, with a tokenizer), in fp32 and bf16."""
    root = tmp_path_factory.mktemp("models")
    for dtype in ("float32", "bfloat16"):
        base, tuned = tiny_gpt2(seed=0).to(getattr(torch, dtype)), tiny_gpt2(seed=1).to(getattr(torch, dtype))
        base.save_pretrained(root / dtype / "base", max_shard_size="20KB")
        tuned.save_pretrained(root / dtype / "tuned")
        tiny_tokenizer.save_pretrained(root / dtype / "tuned")
    return root


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_several_alphas_in_one_pass(saved, tmp_path, dtype):
    base_dir, tuned_dir = saved / dtype / "base", saved / dtype / "tuned"
    assert (base_dir / "model.safetensors.index.json").is_file()  # the input really is sharded
    outs = interpolate_checkpoints(base_dir, tuned_dir, [0.0, 1.0, 0.5, -1.0], tmp_path / "out", shard_size="30KB")
    assert [p.name for p in outs] == ["alpha_0", "alpha_1", "alpha_0.5", "alpha_-1"]
    base, tuned = _load_weights(base_dir), _load_weights(tuned_dir)
    weights = {p.name: _load_weights(p) for p in outs}
    assert all(torch.equal(weights["alpha_0"][k], base[k]) for k in base)  # bit for bit, in their dtype
    assert all(torch.equal(weights["alpha_1"][k], tuned[k]) for k in tuned)
    for alpha in (0.5, -1.0):
        expected = interpolate_state_dict(base, tuned, alpha)
        got = weights[f"alpha_{alpha:g}"]
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == getattr(torch, dtype) for k in expected)
    # sharded output with an index covering every tensor, and each shard within the size
    index = json.loads((outs[2] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 1
    for shard in set(index["weight_map"].values()):
        with safe_open(outs[2] / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert sizes <= 30_000 or len(list(f.keys())) == 1
    # config, tokenizer and card
    for out, alpha in zip(outs, [0.0, 1.0, 0.5, -1.0], strict=True):
        assert (out / "config.json").read_text() == (tuned_dir / "config.json").read_text()
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        card = (out / "README.md").read_text()
        assert f"| alpha | {alpha} |" in card and str(base_dir) in card and str(tuned_dir) in card
        assert ModelCard(card).data.base_model is None  # a local folder is no Hub id for the metadata
    assert _leftovers(tmp_path) == []


def test_output_loads_and_matches_in_memory_interpolation(saved, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = interpolate_checkpoints(saved / "float32" / "base", saved / "float32" / "tuned", 1.5, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = interpolate_models(tiny_gpt2(seed=0), tiny_gpt2(seed=1), 1.5)
    ids = torch.randint(5, 100, (2, 6))
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
    assert len(AutoTokenizer.from_pretrained(out)) == model.config.vocab_size


def test_dtype_argument_casts_outputs_and_config(saved, tmp_path):
    out = interpolate_checkpoints(saved / "float32" / "base", saved / "float32" / "tuned", 0.25, tmp_path / "out", dtype="bfloat16")
    base, tuned = _load_weights(saved / "float32" / "base"), _load_weights(saved / "float32" / "tuned")
    got = _load_weights(out)
    assert all(torch.equal(got[k], interpolate_state_dict(base, tuned, 0.25)[k].bfloat16()) for k in base)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_hub_repo_ids_offline(saved, tmp_path):
    cache = tmp_path / "cache"
    lay_out_as_hub_repo(saved / "float32" / "base", "org/base", cache)
    lay_out_as_hub_repo(saved / "float32" / "tuned", "org/tuned", cache)
    out = interpolate_checkpoints("org/base", "org/tuned", 0.5, tmp_path / "out", cache_dir=cache)
    local = interpolate_checkpoints(saved / "float32" / "base", saved / "float32" / "tuned", 0.5, tmp_path / "local")
    got, expected = _load_weights(out), _load_weights(local)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert ModelCard.load(out / "README.md").data.base_model == "org/base"
    with pytest.raises(ValueError, match=r"`tuned`='org/missing' is neither a local folder nor a Hub repo"):
        interpolate_checkpoints("org/base", "org/missing", 0.5, tmp_path / "other", cache_dir=cache)


def test_pickled_bin_inputs_load_with_weights_only(saved, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    state = _load_weights(saved / "float32" / "tuned")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((saved / "float32" / "tuned" / "config.json").read_text())
    out = interpolate_checkpoints(saved / "float32" / "base", folder, 0.5, tmp_path / "out")
    expected = interpolate_state_dict(_load_weights(saved / "float32" / "base"), state, 0.5)
    assert all(torch.equal(_load_weights(out)[k], v) for k, v in expected.items())
    # an arbitrary object in the pickle is refused, not executed
    torch.save({**state, "payload": Path("x")}, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        interpolate_checkpoints(saved / "float32" / "base", folder, 0.5, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def _save_raw(folder: Path, tensors: dict, config_from: Path) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((config_from / "config.json").read_text())
    return folder


def test_mismatches_are_refused_before_writing(saved, tmp_path):
    base_dir = saved / "float32" / "base"
    tuned = _load_weights(saved / "float32" / "tuned")
    edits = {
        "keys": ({**{k: v for k, v in tuned.items() if k != "transformer.ln_f.bias"}, "extra.weight": torch.zeros(2)},
                 r"1 missing from tuned \['transformer.ln_f.bias'\], 1 unexpected in tuned \['extra.weight'\]"),
        "shape": ({**tuned, "transformer.wpe.weight": torch.zeros(64, 32)},
                  r"differ in shape .*transformer.wpe.weight: \(128, 32\) vs \(64, 32\)"),
        "dtype": ({**tuned, "transformer.ln_f.bias": tuned["transformer.ln_f.bias"].half()},
                  r"differ in dtype .*transformer.ln_f.bias: torch.float32 vs torch.float16"),
    }
    for name, (tensors, message) in edits.items():
        folder = _save_raw(tmp_path / name, tensors, saved / "float32" / "tuned")
        with pytest.raises(ValueError, match=message):
            interpolate_checkpoints(base_dir, folder, 0.5, tmp_path / "out")
    llama = tmp_path / "llama"
    tiny_llama().save_pretrained(llama)
    with pytest.raises(ValueError, match=r"different architectures: model_type 'gpt2' vs 'llama'"):
        interpolate_checkpoints(base_dir, llama, 0.5, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`base`=.*empty' has no weights"):
        interpolate_checkpoints(tmp_path / "empty", llama, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_argument_errors(saved, tmp_path):
    base, tuned = saved / "float32" / "base", saved / "float32" / "tuned"
    with pytest.raises(ValueError, match=r"`alpha` has repeated values"):
        interpolate_checkpoints(base, tuned, [0.5, 0.5], tmp_path / "out")
    with pytest.raises(ValueError, match=r"non-empty sequence"):
        interpolate_checkpoints(base, tuned, [], tmp_path / "out")
    with pytest.raises(ValueError, match=r"`shard_size` must be a positive number of bytes"):
        interpolate_checkpoints(base, tuned, 0.5, tmp_path / "out", shard_size=0)
    with pytest.raises(ValueError, match=r"`shard_size` must be bytes or a size like '5GB', got '5XB' \(Unit 'XB' not supported"):
        interpolate_checkpoints(base, tuned, 0.5, tmp_path / "out", shard_size="5XB")
    with pytest.raises(ValueError, match=r"`dtype` must be None or one of"):
        interpolate_checkpoints(base, tuned, 0.5, tmp_path / "out", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"overlaps the input folder"):
        interpolate_checkpoints(base, tuned, 0.5, tuned / "sub")
    assert not (tmp_path / "out").exists() and not (tuned / "sub").exists()


def test_non_empty_out_dir_needs_overwrite(saved, tmp_path):
    base, tuned = saved / "float32" / "base", saved / "float32" / "tuned"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match=r"`out_dir`=.* is not empty; pass overwrite=True"):
        interpolate_checkpoints(base, tuned, 0.5, out)
    assert (out / "keep.txt").read_text() == "old"
    interpolate_checkpoints(base, tuned, 0.5, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_interrupted_run_leaves_nothing(saved, tmp_path, monkeypatch):
    base, tuned = saved / "float32" / "base", saved / "float32" / "tuned"
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("old")
    calls = {"n": 0}
    real_save_file = checkpoints.save_file

    def failing_save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # some shards are already complete on disk by now
            raise KeyboardInterrupt
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        interpolate_checkpoints(base, tuned, [0.5, 2.0], tmp_path / "out", shard_size="20KB")
    assert not (tmp_path / "out").exists()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        interpolate_checkpoints(base, tuned, 0.5, previous, overwrite=True, shard_size="20KB")
    assert sorted(p.name for p in previous.iterdir()) == ["keep.txt"]  # the old output is intact
    assert _leftovers(tmp_path) == []


_KILLED_WRITER = """
import sys, time
import hf_ext.merging.checkpoints as checkpoints

real_save_file = checkpoints.save_file

def save_file_then_hang(*args, **kwargs):  # the first shard reaches the disk, then the writer stalls
    real_save_file(*args, **kwargs)
    print("one shard written", flush=True)
    time.sleep(600)

checkpoints.save_file = save_file_then_hang
base, tuned, out = sys.argv[1:]
checkpoints.interpolate_checkpoints(base, tuned, [0.5, 2.0], out, shard_size="20KB", overwrite=True)
"""


def test_killed_writer_leaves_the_old_output_whole(saved, tmp_path):
    """SIGKILL mid-write (nothing of Python's runs after it): the old output stays whole, nothing partial is visible."""
    base, tuned = saved / "float32" / "base", saved / "float32" / "tuned"
    old = interpolate_checkpoints(base, tuned, [0.5, 2.0], tmp_path / "out", shard_size="20KB")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(base), str(tuned), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()
        assert line == "one shard written\n", proc.stderr.read()[-3000:]
        assert list(tmp_path.glob(".out.tmp-*/alpha_0.5/*.safetensors"))  # half-way, in a hidden temporary folder
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert after == before and [p.name for p in old] == ["alpha_0.5", "alpha_2"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["out"]  # nothing partial visible
    # the next run replaces the old output whole (the killed run's hidden temporary folder is left as it was)
    interpolate_checkpoints(base, tuned, 1.5, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "alpha_0.5").exists()


def test_chunked_streaming_equals_whole_tensors(saved, tmp_path, monkeypatch):
    import hf_ext.merging.checkpoints as checkpoints

    base, tuned = saved / "bfloat16" / "base", saved / "bfloat16" / "tuned"
    whole = _load_weights(interpolate_checkpoints(base, tuned, 0.3, tmp_path / "whole"))
    monkeypatch.setattr(checkpoints, "_CHUNK_ELEMENTS", 97)  # divides no tensor size
    chunked = _load_weights(interpolate_checkpoints(base, tuned, 0.3, tmp_path / "chunked"))
    assert chunked.keys() == whole.keys() and all(torch.equal(chunked[k], whole[k]) for k in whole)
