"""Seeded synthetic SAEs with a known (planted) matching, for tests, the demo, examples and benchmarks.

The story they tell: each feature has a *folded* direction (decoder row ``u_i`` at threshold 1, encoder
column ``e_i``, bias ``c_i``) that drifts a little from one layer to the next, while the JumpReLU
threshold ``theta_i`` of each layer's SAE is drawn independently, log-uniformly. The stored (unfolded)
weights are ``W_dec[i] = u_i / theta_i``, ``W_enc[:, i] = e_i * theta_i`` and ``b_enc[i] = c_i * theta_i``,
so folding (``W_dec[i] * theta_i``, ...; Eq. 4 of arXiv 2410.07656) recovers the drifting directions, while the unfolded weights
differ by per-feature scales that hide the match. The next layer's features are stored in a random
order: that permutation is what matching should recover.
"""

import math

import torch

from hf_ext.sae_match.sae import SparseAutoencoder


def _log_uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand(n, generator=generator))


def _unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def _store(u: torch.Tensor, e: torch.Tensor, c: torch.Tensor, b_dec: torch.Tensor, theta: torch.Tensor) -> SparseAutoencoder:
    """A JumpReLU SAE whose folded weights are (u, e, c) and whose thresholds are ``theta``."""
    return SparseAutoencoder(
        (e * theta[:, None]).T.contiguous(), c * theta, u / theta[:, None], b_dec,
        activation="jumprelu", threshold=theta, metadata={"synthetic": True},
    )


def random_sae(
    n_features: int = 256,
    d_model: int = 32,
    activation: str = "jumprelu",
    *,
    k: int | None = None,
    seed: int = 0,
    apply_b_dec_to_input: bool = False,
) -> SparseAutoencoder:
    """A random SAE (any activation); JumpReLU thresholds are log-uniform in [0.05, 2]."""
    g = torch.Generator().manual_seed(seed)
    threshold = _log_uniform(n_features, 0.05, 2.0, g) if activation == "jumprelu" else None
    if activation == "topk" and k is None:
        k = max(1, n_features // 8)
    return SparseAutoencoder(
        torch.randn(d_model, n_features, generator=g) / math.sqrt(d_model),
        0.1 * torch.randn(n_features, generator=g),
        torch.randn(n_features, d_model, generator=g) / math.sqrt(d_model),
        0.1 * torch.randn(d_model, generator=g),
        activation=activation, threshold=threshold, k=k, apply_b_dec_to_input=apply_b_dec_to_input,
    )


def planted_chain(
    n_layers: int = 2,
    n_features: int = 256,
    d_model: int = 32,
    *,
    noise: float = 0.1,
    shared_fraction: float = 1.0,
    threshold_range: tuple[float, float] = (0.02, 2.0),
    seed: int = 0,
) -> tuple[list[SparseAutoencoder], list[torch.Tensor]]:
    """JumpReLU SAEs of ``n_layers`` consecutive layers with planted matchings.

    Args:
        n_layers: how many SAEs.
        n_features, d_model: their width and input size.
        noise: the drift of each folded direction per layer, relative to its norm (1 = as large as the vector).
        shared_fraction: the fraction of features that continue from one layer to the next; the others
            are replaced by fresh random features (their planted match is arbitrary).
        threshold_range: thresholds are drawn log-uniformly from this range, independently per layer.
        seed: the random seed.

    Returns:
        ``(saes, permutations)``: ``permutations[l][i]`` is the feature of SAE ``l + 1`` that continues
        feature ``i`` of SAE ``l``.
    """
    if not 0.0 <= shared_fraction <= 1.0:
        raise ValueError(f"`shared_fraction` must be in [0, 1], got {shared_fraction}.")
    g = torch.Generator().manual_seed(seed)
    scale = _log_uniform(n_features, 0.5, 2.0, g)[:, None]  # folded decoder norms vary per feature
    u, e = _unit_rows(n_features, d_model, g) * scale, _unit_rows(n_features, d_model, g)
    c = -0.5 * torch.rand(n_features, generator=g)
    b_dec = 0.1 * torch.randn(d_model, generator=g)
    saes = [_store(u, e, c, b_dec, _log_uniform(n_features, *threshold_range, g))]
    permutations = []
    for _ in range(n_layers - 1):
        # drift every direction, replace the features that do not continue
        u = u + noise * u.norm(dim=1, keepdim=True) * _unit_rows(n_features, d_model, g) * torch.rand(n_features, 1, generator=g)
        e = e + noise * _unit_rows(n_features, d_model, g) * torch.rand(n_features, 1, generator=g)
        fresh = torch.rand(n_features, generator=g) >= shared_fraction
        u[fresh] = _unit_rows(int(fresh.sum()), d_model, g) * scale[fresh]
        e[fresh] = _unit_rows(int(fresh.sum()), d_model, g)
        # store the next layer in a random order: feature i of this layer is feature perm[i] of the next
        perm = torch.randperm(n_features, generator=g)
        order = torch.argsort(perm)
        u, e, c = u[order], e[order], c[order]
        scale = scale[order]
        saes.append(_store(u, e, c, b_dec, _log_uniform(n_features, *threshold_range, g)))
        permutations.append(perm)
    return saes, permutations


def planted_pair(
    n_features: int = 256,
    d_model: int = 32,
    *,
    noise: float = 0.1,
    shared_fraction: float = 1.0,
    threshold_range: tuple[float, float] = (0.02, 2.0),
    seed: int = 0,
) -> tuple[SparseAutoencoder, SparseAutoencoder, torch.Tensor]:
    """Two JumpReLU SAEs of adjacent layers and the planted permutation (see `planted_chain`)."""
    saes, perms = planted_chain(
        2, n_features, d_model, noise=noise, shared_fraction=shared_fraction, threshold_range=threshold_range, seed=seed
    )
    return saes[0], saes[1], perms[0]


__all__ = ["planted_chain", "planted_pair", "random_sae"]
