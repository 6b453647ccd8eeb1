"""Each format: files written by hand as the publishers lay them out, loaded, and compared with plain math.

The hand-written layouts copy what SAELens 6.54.12 (`save_model` / `save_inference_model`) and EleutherAI's sparsify
1.3.3 (`SparseCoder.save_to_disk`) write: the same cfg.json keys and safetensors names. Where `sae-lens` or
`eai-sparsify` is installed (extras `sae-lens` / `sparsify`), the tests at the end also write folders with those
libraries themselves and hold `load_sae` to their own encode/decode; elsewhere those tests skip, saying so.
"""

import json
import os
import warnings

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


def write_saelens_topk_training_checkpoint(folder, w, k):
    """A TopKTrainingSAE as SAELens 6.54.12's `save_model` writes it with the config's defaults: unfolded weights
    and `rescale_acts_by_decoder_norm: true` (cfg.json keys copied from a real save)."""
    os.makedirs(folder, exist_ok=True)
    save_file({name: w[name] for name in ("W_dec", "W_enc", "b_dec", "b_enc")}, os.path.join(folder, "sae_weights.safetensors"))
    details = {"decoder_init_norm": 0.1, "use_sparse_activations": False, "aux_loss_coefficient": 1.0}
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "training_architecture": "topk",
                        "training_architecture_details": details, "hook_name": "blocks.3.hook_resid_post"},
           **details, "k": k, "rescale_acts_by_decoder_norm": True, "architecture": "topk"}
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def write_saelens_pre_6(folder, w, k):
    """A TopK SAE in the flat cfg.json of SAELens < 6: the activation in `activation_fn_str`/`activation_fn_kwargs`
    under `architecture: "standard"`, `hook_point`, a boolean `normalize_activations`, an all-ones `scaling_factor`."""
    os.makedirs(folder, exist_ok=True)
    tensors = {name: w[name] for name in ("W_dec", "W_enc", "b_dec", "b_enc")} | {"scaling_factor": torch.ones(F)}
    save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
           "hook_point": "blocks.3.hook_resid_post", "hook_point_layer": 3, "hook_point_head_index": None,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "context_size": 128, "prepend_bos": True, "normalize_activations": False,
           "sae_lens_training_version": "3.20.0"}
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def write_sparsify(folder, w, k, transcode=False, **cfg):
    os.makedirs(folder, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
              os.path.join(folder, "sae.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": F, "k": k,
                   "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": D, **cfg}, f)


def topk_relu(pre, k):
    """Keep the k largest entries of each row, ReLU'd; zero the rest."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


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


def test_saelens_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    """SAELens' TopKTrainingSAE default: features TopK(pre * ||W_dec_i||), reconstruction (f / ||W_dec_i||) @ W_dec."""
    w = _weights(8)
    w["W_dec"] = w["W_dec"] * torch.linspace(0.05, 3.0, F)[:, None]  # decoder rows far from unit norm
    write_saelens_topk_training_checkpoint(tmp_path, w, k=4)
    sae = load_sae(tmp_path)
    norms = w["W_dec"].norm(dim=-1)
    x = torch.randn(50, D)
    acts = topk_relu(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, 4)
    assert (sae.activation, sae.k, sae.metadata["decoder_norms_folded"]) == ("topk", 4, True)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), (acts / norms) @ w["W_dec"] + w["b_dec"])
    # the fold itself, written out: W_enc[:, i] * n_i, b_enc[i] * n_i, W_dec[i] / n_i
    assert torch.equal(sae.W_enc, w["W_enc"] * norms[None, :]) and torch.equal(sae.b_enc, w["b_enc"] * norms)
    assert torch.equal(sae.W_dec, w["W_dec"] / norms[:, None]) and torch.equal(sae.b_dec, w["b_dec"])
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(F))


def test_saelens_pre_6_flat_config(tmp_path):
    w = _weights(9)
    write_saelens_pre_6(tmp_path, w, k=5)
    sae = load_sae(tmp_path)
    x = torch.randn(20, D)
    acts = topk_relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 5)
    assert (sae.activation, sae.k, sae.metadata["hook_name"]) == ("topk", 5, "blocks.3.hook_resid_post")
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"])


def test_saelens_log_threshold_and_unsupported(tmp_path):
    w = _weights(2)
    w_log = {**{k: v for k, v in w.items() if k != "threshold"}, "log_threshold": w["threshold"].log()}
    write_saelens(tmp_path / "log", w_log, "jumprelu")
    torch.testing.assert_close(load_sae(tmp_path / "log").threshold, w["threshold"])
    for architecture, reason in [("gated", "second encoder path"), ("batchtopk", "top k over the whole batch.*JumpReLU"),
                                 ("jumprelu_transcoder", "predicts another hook's output"), ("mystery", "")]:
        write_saelens(tmp_path / architecture, w, architecture)
        with pytest.raises(ValueError, match=f"SAELens architecture '{architecture}' in .*cfg.json is not supported.*{reason}.*"
                                             r"supported: \['jumprelu', 'standard', 'topk'\]"):
            load_sae(tmp_path / architecture)
    write_saelens(tmp_path / "norm", w, "standard", {"normalize_activations": "constant_norm_rescale"})
    with pytest.raises(ValueError, match="`normalize_activations`='constant_norm_rescale' .* not supported"):
        load_sae(tmp_path / "norm")
    write_saelens(tmp_path / "old_norm", w, "standard", {"normalize_activations": True})  # SAELens < 6
    with pytest.raises(ValueError, match="`normalize_activations`='expected_average_only_in'"):
        load_sae(tmp_path / "old_norm")
    write_saelens(tmp_path / "tanh", w, "standard", {"activation_fn_str": "tanh-relu"})
    with pytest.raises(ValueError, match="SAELens activation 'tanh-relu' .* not supported; supported: 'relu', and 'topk'"):
        load_sae(tmp_path / "tanh")
    write_saelens(tmp_path / "extra", {**w, "b_gate": torch.zeros(F)}, "standard")
    with pytest.raises(ValueError, match=r"tensors this loader does not use: \['b_gate'\]"):
        load_sae(tmp_path / "extra")
    write_saelens_pre_6(tmp_path / "scaled", w, k=3)
    save_file({**{n: w[n] for n in ("W_dec", "W_enc", "b_dec", "b_enc")}, "scaling_factor": torch.full((F,), 2.0)},
              tmp_path / "scaled" / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="`scaling_factor` other than 1"):
        load_sae(tmp_path / "scaled")


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify(tmp_path, transcode):
    w = _weights(3)
    write_sparsify(tmp_path / "layers.6", w, k=5, transcode=transcode)
    sae = load_sae(tmp_path / "layers.6")
    x = torch.randn(20, D)
    x_in = x if transcode else x - w["b_dec"]  # a transcoder does not subtract b_dec from its input
    acts = topk_relu(x_in @ w["W_enc"] + w["b_enc"], 5)  # TopK(ReLU(encoder(x_in)))
    assert (sae.metadata["format"], sae.activation, sae.k, sae.metadata["hook_name"]) == ("sparsify", "topk", 5, "layers.6")
    assert sae.metadata["transcode"] == transcode
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), acts @ w["W_dec"] + w["b_dec"])


def test_sparsify_unsupported(tmp_path):
    w = _weights(10)
    write_sparsify(tmp_path / "groupmax", w, k=4, activation="groupmax")
    with pytest.raises(ValueError, match="sparsify activation 'groupmax' .* each of k groups of latents; supported: 'topk'"):
        load_sae(tmp_path / "groupmax")
    write_sparsify(tmp_path / "skip", w, k=4, skip_connection=True)
    with pytest.raises(ValueError, match="sparsify `skip_connection`=True .* W_skip"):
        load_sae(tmp_path / "skip")
    write_sparsify(tmp_path / "encoder_only", w, k=4)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "b_dec": w["b_dec"]},
              tmp_path / "encoder_only" / "sae.safetensors")
    with pytest.raises(ValueError, match="has no decoder \\(`W_dec`\\)"):
        load_sae(tmp_path / "encoder_only")


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


# ---------------------------------------------------------------------------------------------------------------------
# Against the libraries that write these folders (extras `sae-lens`, `sparsify`); skipped, with the reason, without.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_lens():
    with warnings.catch_warnings():
        # transformer_lens (imported by sae_lens) warns about its own deprecated `utils` module on import.
        warnings.filterwarnings("ignore", message="The 'utils' module has been deprecated", category=DeprecationWarning)
        return pytest.importorskip("sae_lens", reason="sae-lens is not installed (`pip install hf-ext[sae-lens]`)")


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify", reason="eai-sparsify is not installed (`pip install hf-ext[sparsify]`)")


def _randomize(module, seed):
    """Random weights, decoder rows of norms spread over [0.05, 3] (far from unit norm, as during training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=g))
            if name == "threshold":
                parameter.copy_(0.2 * torch.rand(parameter.shape, generator=g) + 0.05)
        module.W_dec.mul_(torch.linspace(0.05, 3.0, module.W_dec.shape[0])[:, None] / module.W_dec.norm(dim=-1, keepdim=True))
    return module


def _assert_same_sae_function(ours, encode, decode, x):
    with torch.no_grad():
        acts = encode(x)
        torch.testing.assert_close(ours.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), decode(acts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("save", ["save_model", "save_inference_model"])
def test_saelens_training_saes_as_saelens_writes_them(tmp_path, sae_lens, kind, save):
    """A TrainingSAE saved by SAELens as a checkpoint (`save_model`) or as its runner's final output
    (`save_inference_model`), with the config's defaults (TopK: `rescale_acts_by_decoder_norm=True`), loads to
    SAELens' own encode/decode of the training SAE."""
    config_class = {"standard": sae_lens.StandardTrainingSAEConfig, "jumprelu": sae_lens.JumpReLUTrainingSAEConfig,
                    "topk": sae_lens.TopKTrainingSAEConfig}[kind]
    training_class = {"standard": sae_lens.StandardTrainingSAE, "jumprelu": sae_lens.JumpReLUTrainingSAE,
                      "topk": sae_lens.TopKTrainingSAE}[kind]
    reference = _randomize(training_class(config_class(d_in=D, d_sae=F, **({"k": 4} if kind == "topk" else {}))), seed=11)
    getattr(reference, save)(tmp_path)
    sae = load_sae(tmp_path)
    assert sae.activation == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[kind]
    _assert_same_sae_function(sae, reference.encode, reference.decode, 2 * torch.randn(64, D))
    if kind == "topk":  # the fold is SAELens' own: bit for bit what its loader gives with fold_W_dec_norm=True
        folded = sae_lens.SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(sae, name), getattr(folded, name)), name


def test_saelens_batchtopk(tmp_path, sae_lens):
    """A BatchTopK training checkpoint is refused; SAELens' inference save of it (JumpReLU) loads to SAELens' own."""
    reference = _randomize(sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=4)), 12)
    reference.topk_threshold.fill_(0.3)
    reference.save_model(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="architecture 'batchtopk' .* top k over the whole batch"):
        load_sae(tmp_path / "checkpoint")
    reference.save_inference_model(tmp_path / "final")
    sae, saved = load_sae(tmp_path / "final"), sae_lens.SAE.load_from_disk(tmp_path / "final")
    assert sae.activation == "jumprelu" and type(saved).__name__ == "JumpReLUSAE"
    _assert_same_sae_function(sae, saved.encode, saved.decode, 2 * torch.randn(64, D))


def test_saelens_refuses_gated(tmp_path, sae_lens):
    _randomize(sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=F)), 13).save_model(tmp_path)
    with pytest.raises(ValueError, match="architecture 'gated' .* second encoder path"):
        load_sae(tmp_path)


@pytest.mark.parametrize("writer", ["topk_training_checkpoint", "pre_6", "standard", "jumprelu", "save_sae"])
def test_hand_written_saelens_layouts_read_alike_in_saelens(tmp_path, sae_lens, writer):
    """The layouts the tests above write by hand, and `save_sae`'s, are ones SAELens itself reads, to the same
    function."""
    from hf_ext.sae_match.synthetic import random_sae

    w = _weights(14)
    w["W_dec"] = w["W_dec"] * torch.linspace(0.05, 3.0, F)[:, None]
    if writer == "save_sae":
        save_sae(random_sae(F, D, "topk", k=3, apply_b_dec_to_input=True), tmp_path)
        reference = sae_lens.SAE.load_from_disk(tmp_path)
    elif writer == "topk_training_checkpoint":
        write_saelens_topk_training_checkpoint(tmp_path, w, k=4)
        reference = sae_lens.TopKTrainingSAE.load_from_disk(tmp_path)
    elif writer == "pre_6":
        write_saelens_pre_6(tmp_path, w, k=4)
        reference = sae_lens.SAE.load_from_disk(tmp_path)
    else:
        write_saelens(tmp_path, w, writer)
        reference = sae_lens.SAE.load_from_disk(tmp_path)
    _assert_same_sae_function(load_sae(tmp_path), reference.encode, reference.decode, 2 * torch.randn(64, D))


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_as_sparsify_writes_it(tmp_path, sparsify, transcode):
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    reference = _randomize(SparseCoder(D, SparseCoderConfig(num_latents=F, k=5, transcode=transcode)), seed=15)
    reference.save_to_disk(tmp_path / "layers.4.mlp")
    sae = load_sae(tmp_path / "layers.4.mlp")

    def encode(x):
        top_acts, top_indices, _ = reference.encode(x)
        return torch.zeros(x.shape[0], F).scatter(-1, top_indices, top_acts)

    def decode(acts):  # SparseCoder.decode with sparsify's torch decoder (its Triton one needs a GPU)
        top = acts.topk(5, dim=-1)
        return eager_decode(top.indices, top.values, reference.W_dec.mT) + reference.b_dec

    assert (sae.metadata["hook_name"], sae.metadata["transcode"]) == ("layers.4.mlp", transcode)
    _assert_same_sae_function(sae, encode, decode, 2 * torch.randn(64, D))
