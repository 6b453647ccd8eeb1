"""Metrics against plain reference computations."""

import pytest
import torch

from hf_ext.sae_match import (
    collect_hidden_states,
    delta_lm_loss,
    encode_permute_decode,
    evaluate_approximation,
    fold,
    folded_mse,
    match,
    matching_score,
)
from hf_ext.sae_match.metrics import fraction_of_variance_unexplained
from hf_ext.sae_match.synthetic import planted_pair, random_sae
from hf_ext.testing import tiny_corpus, tiny_gpt2


def test_folded_mse_reference():
    sae_a, sae_b, truth = planted_pair(40, 6, seed=0)
    perm = torch.randperm(40)
    da, db = sae_a.W_dec * sae_a.threshold[:, None], sae_b.W_dec * sae_b.threshold[:, None]
    expected = sum(float((da[i] - db[perm[i]]).square().sum()) for i in range(40)) / (40 * 6)
    assert folded_mse(sae_a, sae_b, perm) == pytest.approx(expected, rel=1e-5)
    assert folded_mse(sae_a, sae_b, truth) < folded_mse(sae_a, sae_b, perm)


def test_encode_permute_decode_reference():
    sae_a, sae_b = random_sae(30, 8, seed=1), random_sae(30, 8, seed=2)
    perm = torch.randperm(30)
    x = torch.randn(5, 8)
    f = sae_a.encode(x)
    expected = torch.stack([sum(f[t, i] * sae_b.W_dec[perm[i]] for i in range(30)) + sae_b.b_dec for t in range(5)])
    torch.testing.assert_close(encode_permute_decode(sae_a, sae_b, perm, x), expected, rtol=1e-5, atol=1e-5)


def test_fvu_and_explained_variance_reference():
    x, x_hat = torch.randn(50, 4), torch.randn(50, 4)
    mean = x.mean(0)
    expected = sum(float((x[t] - x_hat[t]).square().sum()) for t in range(50)) / sum(float((x[t] - mean).square().sum()) for t in range(50))
    assert fraction_of_variance_unexplained(x, x_hat) == pytest.approx(expected, rel=1e-6)
    sae_a, sae_b, truth = planted_pair(64, 8, noise=0.05, seed=3)
    hidden_a = torch.randn(200, 8)
    hidden_b = encode_permute_decode(sae_a, sae_b, truth, hidden_a) + 0.01 * torch.randn(200, 8)
    scores = evaluate_approximation(sae_a, sae_b, truth, hidden_a, hidden_b)
    assert scores["explained_variance"] == pytest.approx(1 - scores["fvu"])
    assert scores["explained_variance"] > 0.9
    assert evaluate_approximation(sae_a, sae_b, torch.randperm(64), hidden_a, hidden_b)["fvu"] > scores["fvu"]


def test_matching_score_reference():
    sae_a, sae_b = random_sae(20, 6, seed=4), random_sae(20, 6, seed=5)
    perm = torch.randperm(20)
    ha, hb = torch.randn(30, 6), torch.randn(30, 6)
    fa, fb = sae_a.encode(ha), sae_b.encode(hb)
    both = sum(int(fa[t, i] > 0 and fb[t, perm[i]] > 0) for t in range(30) for i in range(20))
    fired = sum(int(fa[t, i] > 0) for t in range(30) for i in range(20))
    assert matching_score(sae_a, sae_b, perm, ha, hb) == pytest.approx(both / fired)
    # an SAE matched with a permuted copy of itself fires together always
    assert matching_score(sae_a, sae_a, torch.arange(20), ha, ha) == 1.0


def test_collect_hidden_states_reference(tiny_tokenizer):
    model = tiny_gpt2(tokenizer=tiny_tokenizer)
    texts = tiny_corpus()[:5]
    states = collect_hidden_states(model, tiny_tokenizer, texts, [0], batch_size=2)
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).hidden_states[1]  # output of decoder layer 0
    torch.testing.assert_close(states[0], reference[batch["attention_mask"].bool()], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 decoder layers"):
        collect_hidden_states(model, tiny_tokenizer, texts, [5])


def test_delta_lm_loss_reference(tiny_tokenizer):
    model = tiny_gpt2(tokenizer=tiny_tokenizer)
    texts = tiny_corpus()[:6]
    sae_a, sae_b = fold(random_sae(64, 32, seed=6)), fold(random_sae(64, 32, seed=7))
    m = match(sae_a, sae_b)
    result = delta_lm_loss(model, tiny_tokenizer, texts, 0, sae_a, sae_b, m, batch_size=3)
    # reference: one batch, hidden states from output_hidden_states, the replacement via a hand-written hook
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    with torch.no_grad():
        clean = model(**batch, labels=labels, output_hidden_states=True)
        x_hat = encode_permute_decode(sae_a, sae_b, m, clean.hidden_states[1])
        mask = batch["attention_mask"].bool()[..., None]
        handle = model.transformer.h[1].register_forward_hook(lambda mod, i, o: torch.where(mask, x_hat, o))
        patched = model(**batch, labels=labels)
        handle.remove()
    assert result["loss"] == pytest.approx(float(clean.loss), rel=1e-5)
    assert result["patched_loss"] == pytest.approx(float(patched.loss), rel=1e-5)
    assert result["delta_loss"] == pytest.approx(float(patched.loss - clean.loss), rel=1e-4, abs=1e-6)
    assert result["delta_loss"] > 0  # random SAEs are a poor stand-in for layer 1
