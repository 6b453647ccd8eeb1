"""Each format: files written by hand as the publishers lay them out, loaded, and compared with plain math."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_ext.sae_match import load_sae, save_sae
from hf_ext.testing import lay_out_as_hub_repo

D, F = 8, 24


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        W_enc=torch.randn(D, F, generator=g), b_enc=0.1 * torch.randn(F, generator=g),
        W_dec=torch.randn(F, D, generator=g), b_dec=torch.randn(D, generator=g),
        threshold=0.5 * torch.rand(F, generator=g) + 0.05,
    )


def write_gemma_scope(folder, w, lower_case=False):
    os.makedirs(folder, exist_ok=True)
    names = {k: (k.lower() if lower_case and k.startswith("W_") else k) for k in w}
    np.savez(os.path.join(folder, "params.npz"), **{names[k]: v.numpy() for k, v in w.items()})


def write_saelens(folder, w, architecture, extra_cfg=None):
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v for k, v in w.items() if k != "threshold" or architecture == "jumprelu"}
    save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": D, "d_sae": F, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_post"}, **(extra_cfg or {})}
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def write_sparsify(folder, w, k):
    os.makedirs(folder, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
              os.path.join(folder, "sae.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": k,
                   "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}, f)


def test_gemma_scope(tmp_path):
    w = _weights(0)
    write_gemma_scope(tmp_path / "layer_3", w, lower_case=True)
    sae = load_sae(tmp_path / "layer_3")
    x = torch.randn(20, D)
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    acts = (pre > w["threshold"]) * torch.relu(pre)
    assert sae.metadata["format"] == "gemma_scope" and not sae.apply_b_dec_to_input
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens(tmp_path, architecture):
    w = _weights(1)
    write_saelens(tmp_path, w, architecture, {"k": 4} if architecture == "topk" else None)
    sae = load_sae(tmp_path)
    x = torch.randn(20, D)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        acts = torch.relu(pre)
    elif architecture == "jumprelu":
        acts = torch.relu(pre) * (pre > w["threshold"])
    else:
        top = pre.topk(4, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    assert sae.metadata["format"] == "saelens" and sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"])


def test_saelens_log_threshold_and_unsupported(tmp_path):
    w = _weights(2)
    w_log = {**{k: v for k, v in w.items() if k != "threshold"}, "log_threshold": w["threshold"].log()}
    write_saelens(tmp_path / "log", w_log, "jumprelu")
    torch.testing.assert_close(load_sae(tmp_path / "log").threshold, w["threshold"])
    write_saelens(tmp_path / "gated", w, "gated")
    with pytest.raises(ValueError, match="architecture 'gated'.*not supported"):
        load_sae(tmp_path / "gated")
    write_saelens(tmp_path / "norm", w, "standard", {"normalize_activations": "constant_norm_rescale"})
    with pytest.raises(ValueError, match="normalize_activations"):
        load_sae(tmp_path / "norm")


def test_sparsify(tmp_path):
    w = _weights(3)
    write_sparsify(tmp_path / "layers.6", w, k=5)
    sae = load_sae(tmp_path / "layers.6")
    x = torch.randn(20, D)
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # TopK(ReLU(encoder(x - b_dec)))
    top = pre.topk(5, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert (sae.metadata["format"], sae.activation, sae.k, sae.metadata["hook_name"]) == ("sparsify", "topk", 5, "layers.6")
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("format", ["gemma_scope", "saelens", "sparsify"])
def test_save_load_round_trip_bit_for_bit(tmp_path, format):
    from hf_ext.sae_match.synthetic import random_sae

    activation = {"gemma_scope": "jumprelu", "saelens": "jumprelu", "sparsify": "topk"}[format]
    sae = random_sae(F, D, activation, k=3 if activation == "topk" else None, apply_b_dec_to_input=format == "sparsify")
    save_sae(sae, tmp_path, format=format)
    loaded = load_sae(tmp_path, format=format)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (loaded.activation, loaded.k, loaded.apply_b_dec_to_input) == (sae.activation, sae.k, sae.apply_b_dec_to_input)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no temporary left behind


def test_hub_layout_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w = _weights(4)
    write_gemma_scope(tmp_path / "repo" / "layer_0" / "width_16k" / "average_l0_105", w)
    write_gemma_scope(tmp_path / "repo" / "layer_1" / "width_16k" / "average_l0_102", _weights(5))
    lay_out_as_hub_repo(tmp_path / "repo", "google/gemma-scope-2b-pt-res", tmp_path / "cache")
    sae = load_sae("google/gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105", cache_dir=tmp_path / "cache")
    assert torch.equal(sae.W_dec, w["W_dec"]) and torch.equal(sae.threshold, w["threshold"])
    assert sae.metadata["location"] == "google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="`format` must be 'auto' or one of"):
        load_sae(tmp_path, format="pickle")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No SAE found in .*empty.*params.npz"):
        load_sae(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repository id"):
        load_sae(tmp_path / "does-not-exist")
    w = _weights(6)
    w["W_dec"][0, 0] = float("nan")
    write_gemma_scope(tmp_path / "nan", w)
    with pytest.raises(ValueError, match="`W_dec` has 1 non-finite value"):
        load_sae(tmp_path / "nan")
    write_gemma_scope(tmp_path / "gs", _weights(7))
    with pytest.raises(ValueError, match="`format`='saelens' needs .*cfg.json.*found \\['params.npz'\\]"):
        load_sae(tmp_path / "gs", format="saelens")
