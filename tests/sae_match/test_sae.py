"""SparseAutoencoder encode/decode against plain formulas, folding, validation errors."""

import pytest
import torch

from hf_ext.sae_match import SparseAutoencoder, fold, permute_features
from hf_ext.sae_match.synthetic import random_sae


def reference_encode(W_enc, b_enc, b_dec, x, activation, threshold=None, k=None, subtract_b_dec=False):
    """The formats' activations written out plainly, one token and one feature at a time."""
    out = torch.zeros(x.shape[0], W_enc.shape[1])
    for t in range(x.shape[0]):
        xin = x[t] - b_dec if subtract_b_dec else x[t]
        pre = [float(xin @ W_enc[:, i] + b_enc[i]) for i in range(W_enc.shape[1])]
        if activation == "jumprelu":
            acts = [p if p > float(threshold[i]) and p > 0 else 0.0 for i, p in enumerate(pre)]
        elif activation == "relu":
            acts = [max(p, 0.0) for p in pre]
        else:
            keep = sorted(range(len(pre)), key=lambda i: -pre[i])[:k]
            acts = [max(pre[i], 0.0) if i in keep else 0.0 for i in range(len(pre))]
        out[t] = torch.tensor(acts)
    return out


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("subtract_b_dec", [False, True])
def test_encode_decode_match_reference(activation, subtract_b_dec):
    sae = random_sae(24, 8, activation, k=5 if activation == "topk" else None, seed=1, apply_b_dec_to_input=subtract_b_dec)
    x = torch.randn(6, 8)
    expected = reference_encode(sae.W_enc, sae.b_enc, sae.b_dec, x, activation, sae.threshold, sae.k, subtract_b_dec)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("subtract_b_dec", [False, True])
def test_fold_keeps_encode_decode(seed, subtract_b_dec):
    sae = random_sae(64, 16, "jumprelu", seed=seed, apply_b_dec_to_input=subtract_b_dec)
    folded = fold(sae)
    x = torch.randn(200, 16) * 2
    torch.testing.assert_close(folded(x), sae(x), rtol=1e-4, atol=1e-5)
    # activations are measured in units of the threshold; the threshold becomes 1
    torch.testing.assert_close(folded.encode(x), sae.encode(x) / sae.threshold, rtol=1e-4, atol=1e-5)
    assert torch.equal(folded.threshold, torch.ones(64))
    torch.testing.assert_close(folded.W_dec, sae.W_dec * sae.threshold[:, None])
    torch.testing.assert_close(folded.W_enc, sae.W_enc / sae.threshold[None, :])
    torch.testing.assert_close(fold(folded).W_dec, folded.W_dec)  # folding twice changes nothing
    assert not torch.equal(sae.threshold, folded.threshold)  # the input SAE is left alone


def test_fold_without_thresholds_raises():
    with pytest.raises(ValueError, match="fold.*JumpReLU.*activation='topk'"):
        fold(random_sae(16, 4, "topk", k=2))
    with pytest.raises(ValueError, match="fold.*JumpReLU.*activation='relu'"):
        fold(random_sae(16, 4, "relu"))
    sae = random_sae(16, 4)
    sae.threshold.data[3] = 0.0
    with pytest.raises(ValueError, match="strictly positive thresholds; 1 of 16"):
        fold(sae)


def test_permute_features_permutes_activations():
    sae = random_sae(32, 8, seed=2)
    perm = torch.randperm(32)
    x = torch.randn(10, 8)
    permuted = permute_features(sae, perm)
    torch.testing.assert_close(permuted.encode(x), sae.encode(x)[:, perm])
    torch.testing.assert_close(permuted(x), sae(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="permutation of range"):
        permute_features(sae, torch.zeros(32, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["W_enc", "W_dec", "b_enc", "threshold"])
def test_non_finite_weights_raise(bad, name):
    weights = dict(W_enc=torch.randn(4, 8), b_enc=torch.zeros(8), W_dec=torch.randn(8, 4), b_dec=torch.zeros(4), threshold=torch.ones(8))
    weights[name].view(-1)[1] = bad
    with pytest.raises(ValueError, match=f"`{name}` has 1 non-finite value"):
        SparseAutoencoder(**weights, activation="jumprelu")


def test_bad_arguments_raise():
    W_enc, b_enc, W_dec, b_dec = torch.randn(4, 8), torch.zeros(8), torch.randn(8, 4), torch.zeros(4)
    with pytest.raises(ValueError, match="`W_dec` has shape \\(4, 8\\), expected \\(8, 4\\)"):
        SparseAutoencoder(W_enc, b_enc, W_dec.T, b_dec, activation="relu")
    with pytest.raises(ValueError, match="`activation` must be one of"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, activation="gelu")
    with pytest.raises(ValueError, match="needs `threshold`"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, activation="jumprelu")
    with pytest.raises(ValueError, match="`k` must be an int in \\[1, 8\\]"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, activation="topk", k=9)
    with pytest.raises(TypeError, match="`W_enc` must be a torch.Tensor"):
        SparseAutoencoder(W_enc.numpy(), b_enc, W_dec, b_dec, activation="relu")
