"""Matching: planted permutations, solvers against brute force, chains, persistence, errors."""

import itertools

import numpy as np
import pytest
import torch

from hf_ext.sae_match import LayerMatchings, Matching, fold, match, match_layers, permute_features
from hf_ext.sae_match.matching import (
    _completion_edges,
    _left_out,
    _topk_by_group_maxima,
    dense_cost_matrix,
    feature_vectors,
    topk_candidates,
)
from hf_ext.sae_match.synthetic import planted_chain, planted_pair, random_sae


@pytest.mark.parametrize("method", ["exact", "sparse"])
@pytest.mark.parametrize("using", [("decoder",), ("encoder", "decoder")])
def test_planted_permutation_needs_folding(method, using):
    # thresholds drawn independently per layer over two decades hide the match in the raw weights
    sae_a, sae_b, truth = planted_pair(n_features=384, d_model=32, noise=0.3, threshold_range=(0.01, 1.0), seed=0)
    folded = match(sae_a, sae_b, using, method, fold=True, k=16)
    unfolded = match(sae_a, sae_b, using, method, fold=False, k=16)
    assert torch.equal(folded.permutation, truth)
    assert (unfolded.permutation == truth).double().mean() < 0.8
    assert folded.folded and not unfolded.folded


def test_exact_is_optimal_by_brute_force():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    best = min(itertools.permutations(range(6)), key=lambda p: sum(float((a[i] - b[j]).square().sum()) for i, j in enumerate(p)))
    sae_a = random_sae(6, 5, "relu", seed=0)
    sae_b = random_sae(6, 5, "relu", seed=1)
    sae_a.W_dec.data, sae_b.W_dec.data = a, b
    for method in ("exact", "sparse"):
        m = match(sae_a, sae_b, method=method, k=2)
        assert m.permutation.tolist() == list(best), method
        torch.testing.assert_close(m.cost, (a - b[m.permutation]).square().mean(1))
    assert m.total == pytest.approx(float(m.cost.double().sum()))


def test_dense_cost_matrix_matches_float64_reference():
    a, b = torch.randn(50, 12), torch.randn(40, 12)
    reference = ((a.double()[:, None] - b.double()[None]) ** 2).mean(-1).numpy()
    np.testing.assert_allclose(dense_cost_matrix(a, b, block_bytes=4 * 40 * 7), reference, rtol=1e-5, atol=1e-5)


# 70 features in 9-row blocks: plain topk, and the merge across blocks; 72 features in 16-row blocks
# with k=2: the group-maxima top-k along rows and down the columns, and plain topk on the last 8 rows
@pytest.mark.parametrize("n, block_rows, k", [(70, 9, 3), (72, 16, 2)])
def test_topk_candidates_match_brute_force(n, block_rows, k):
    a, b = torch.randn(n, 6), torch.randn(n, 6)
    rows, cols, dots = topk_candidates(a, b, k=k, block_bytes=4 * n * block_rows, rank_dtype=torch.float32)
    torch.testing.assert_close(dots, (a[rows] * b[cols]).sum(1))
    dist = torch.cdist(a.double(), b.double())
    expected = {(i, int(j)) for i in range(n) for j in dist[i].topk(k, largest=False).indices}
    expected |= {(int(i), j) for j in range(n) for i in dist[:, j].topk(k, largest=False).indices}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(64, 48), (40, 24), (30, 21)])  # 21 does not split into 8 groups: plain topk
def test_topk_by_group_maxima_matches_topk(dim, shape):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-50, 50, shape, generator=g).to(torch.bfloat16)  # many ties
    values, indices = _topk_by_group_maxima(scores, 3, dim)
    expected = scores.topk(3, dim=dim).values
    torch.testing.assert_close(values, expected if dim == 1 else expected.T, rtol=0, atol=0)
    torch.testing.assert_close(scores.gather(dim, indices if dim == 1 else indices.T), expected, rtol=0, atol=0)


def test_bfloat16_ranking_keeps_float32_dots_and_the_nearest_pairs():
    a, b = torch.randn(300, 48), torch.randn(300, 48)
    b[:150] = a[:150] + 0.1 * torch.randn(150, 48)  # clear nearest partners for half the rows
    rows, cols, dots = topk_candidates(a, b, k=4)  # default rank_dtype: bfloat16
    torch.testing.assert_close(dots, (a[rows] * b[cols]).sum(1), rtol=1e-6, atol=1e-5)
    assert {(i, i) for i in range(150)} <= set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert rows.numel() >= 300 * 4


def test_sparse_fallback_completes_an_unmatchable_graph():
    # every row's nearest column and every column's nearest row fall in a few hubs: with k=1 the candidate
    # graph has no perfect matching, and the fallback must complete it
    a = torch.randn(40, 8)
    b = torch.randn(40, 8) * 0.01
    b[:3] = a[:3] * 0.5
    rows, cols, dots = topk_candidates(a, b, k=1)
    weights = ((a[rows].square().sum(1) + b[cols].square().sum(1) - 2 * dots) / 8).double().numpy()
    extra_rows, extra_cols = _completion_edges(rows.numpy(), cols.numpy(), weights, a, b, 1, 2**20)
    assert extra_rows.size > 0
    assert not set(zip(extra_rows.tolist(), extra_cols.tolist(), strict=True)) & set(zip(rows.tolist(), cols.tolist(), strict=True))
    sae_a, sae_b = random_sae(40, 8, "relu", seed=0), random_sae(40, 8, "relu", seed=1)
    sae_a.W_dec.data, sae_b.W_dec.data = a, b
    sparse = match(sae_a, sae_b, method="sparse", k=1)
    assert sorted(sparse.permutation.tolist()) == list(range(40))
    assert sparse.total >= match(sae_a, sae_b, method="exact").total - 1e-6


def test_exact_and_sparse_agree_on_wide_planted_pairs():
    # 4096 features here (the 16k pair is in benchmarks/bench_sae_match.py)
    sae_a, sae_b, truth = planted_pair(n_features=4096, d_model=64, noise=0.5, seed=1)
    exact = match(sae_a, sae_b, method="exact")
    sparse = match(sae_a, sae_b, method="sparse", k=16)  # bfloat16 ranking, float32 edge costs
    assert exact.agreement(sparse) >= 0.99
    assert torch.equal(sparse.permutation, exact.permutation)
    assert (exact.permutation == truth).double().mean() >= 0.99
    torch.testing.assert_close(sparse.cost, exact.cost)


def test_sparse_keeps_continuing_pairs_when_features_have_no_counterpart():
    # 30% of the features are replaced by fresh ones: these must pair among themselves (left out by the
    # first matching) rather than take the candidates of the features that continue
    sae_a, sae_b, truth = planted_pair(n_features=2048, d_model=256, noise=1.1, shared_fraction=0.7, seed=0)
    exact = match(sae_a, sae_b, method="exact")
    sparse = match(sae_a, sae_b, method="sparse")
    continuing = exact.permutation == truth
    assert continuing.double().mean() > 0.65
    assert (sparse.permutation == exact.permutation)[continuing].double().mean() >= 0.95
    assert sparse.total <= 1.05 * exact.total
    assert sorted(sparse.permutation.tolist()) == list(range(2048))


def test_sparse_equals_exact_when_every_feature_is_left_out():
    # every <a_i, b_j> < 0: no candidate beats an orthogonal partner, so all features are left out and
    # paired by a dense LAP, whose edges then hold the dense optimum
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 8, generator=g).abs(), -torch.randn(30, 8, generator=g).abs()
    rows, cols, dots = topk_candidates(a, b, k=2)
    weights = ((a[rows].square().sum(1) + b[cols].square().sum(1) - 2 * dots) / 8).double().numpy()
    assert _left_out(rows.numpy(), cols.numpy(), weights, a, b)[0].size == 30
    sae_a, sae_b = random_sae(30, 8, "relu", seed=0), random_sae(30, 8, "relu", seed=1)
    sae_a.W_dec.data, sae_b.W_dec.data = a, b
    sparse, exact = match(sae_a, sae_b, method="sparse", k=2), match(sae_a, sae_b, method="exact")
    assert torch.equal(sparse.permutation, exact.permutation)


@pytest.mark.parametrize("n", [1, 2, 3, 9])
@pytest.mark.parametrize("all_left_out", [False, True])
def test_sparse_with_k_at_least_n_is_the_exact_optimum(n, all_left_out):
    # k >= n makes the candidate graph complete, so whatever the fallback leaves out and pairs
    # (recursively, or densely when every <a_i, b_j> < 0), the optimum on the graph is the dense one
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    if all_left_out:
        a, b = a.abs(), -b.abs()
    sae_a, sae_b = random_sae(n, 4, "relu", seed=0), random_sae(n, 4, "relu", seed=1)
    sae_a.W_dec.data, sae_b.W_dec.data = a, b
    sparse, exact = match(sae_a, sae_b, method="sparse", k=n), match(sae_a, sae_b, method="exact")
    assert sorted(sparse.permutation.tolist()) == list(range(n))
    assert sparse.total == pytest.approx(exact.total, rel=1e-6)


def test_matching_of_a_permuted_copy_is_that_permutation():
    sae = random_sae(100, 16, seed=3)
    perm = torch.randperm(100)
    permuted = permute_features(sae, perm)  # feature j of `permuted` is feature perm[j] of `sae`
    m = match(sae, permuted, ("encoder", "decoder"), "sparse", k=4)
    assert torch.equal(perm[m.permutation], torch.arange(100))
    assert float(m.cost.abs().max()) < 1e-6


def test_matching_save_load_round_trip(tmp_path):
    m = match(*planted_pair(64, 8, seed=2)[:2], ("encoder", "decoder"), "sparse", k=4)
    m.save(tmp_path / "m.safetensors")
    loaded = Matching.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.permutation, m.permutation) and torch.equal(loaded.cost, m.cost)
    assert (loaded.using, loaded.method, loaded.folded) == (("encoder", "decoder"), "sparse", True)


def _chain(perms, costs):
    return LayerMatchings([Matching(torch.tensor(p), torch.tensor(c)) for p, c in zip(perms, costs, strict=True)])


def test_compose_paths_and_persistence_by_hand():
    chain = _chain([[1, 2, 0], [2, 0, 1], [0, 2, 1]], [[0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.1, 0.1, 0.1]])
    # feature 0: 0 -> 1 -> 0 -> 0 ; feature 1: 1 -> 2 -> 1 -> 2 ; feature 2: 2 -> 0 -> 2 -> 1
    assert chain.compose(0, 3).tolist() == [0, 2, 1]
    assert chain.compose(1, 1).tolist() == [0, 1, 2]
    assert chain.feature_paths(0).tolist() == [[0, 1, 0, 0], [1, 2, 1, 2], [2, 0, 2, 1]]
    torch.testing.assert_close(chain.path_costs(0), torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.1]]))
    survive = chain.persistence(0.5)
    # layer 0: f0 survives 3 steps; f1 dies at once; f2 survives 3
    assert survive.tolist() == [[3, 0, 3], [2, 2, 0], [1, 1, 1], [0, 0, 0]]


def test_match_layers_recovers_planted_chain(tmp_path):
    saes, truths = planted_chain(n_layers=4, n_features=200, d_model=24, noise=0.2, seed=4)
    chain = match_layers(saes, method="sparse", k=8)
    for m, truth in zip(chain.matchings, truths, strict=True):
        assert torch.equal(m.permutation, truth)
    assert torch.equal(chain.compose(0, 3), truths[2][truths[1][truths[0]]])
    chain.save(tmp_path / "chain.safetensors")
    loaded = LayerMatchings.load(tmp_path / "chain.safetensors")
    assert all(torch.equal(x.permutation, y.permutation) and x.method == "sparse" for x, y in zip(loaded.matchings, chain.matchings, strict=True))


def test_errors():
    a, b = random_sae(16, 8), random_sae(16, 12)
    with pytest.raises(ValueError, match="d_model mismatch: `sae_a` reads 8-dimensional .* `sae_b` 12"):
        match(a, b)
    with pytest.raises(ValueError, match="n_features mismatch"):
        match(random_sae(16, 8), random_sae(32, 8))
    with pytest.raises(ValueError, match="`using` must be"):
        match(a, random_sae(16, 8), using=("bias",))
    with pytest.raises(ValueError, match="`method` must be one of"):
        match(a, random_sae(16, 8), method="hungarian")
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        match(a, random_sae(16, 8), method="sparse", k=0)
    with pytest.raises(TypeError, match="`sae_b` must be a SparseAutoencoder"):
        match(a, fold(a).W_dec)
    with pytest.raises(ValueError, match="at least two SAEs"):
        match_layers([a])
    with pytest.raises(ValueError, match="`threshold` must be > 0"):
        _chain([[0, 1]], [[0.1, 0.1]]).persistence(0)


def test_feature_vectors_layout():
    sae = random_sae(10, 4, seed=5)
    v = feature_vectors(sae, ("encoder", "decoder"))
    assert v.shape == (10, 4 + 1 + 4)
    assert torch.equal(v[3], torch.cat([sae.W_enc[:, 3], sae.b_enc[3:4], sae.W_dec[3]]))
