"""SAE Match: data-free matching of sparse-autoencoder features across layers.

From "Mechanistic Permutability: Match Features Across Layers" (Balagansky, Maksimov, Gavrilov;
ICLR 2025, arXiv 2410.07656): fold each JumpReLU SAE's thresholds into its weights (`fold`), then
find the permutation of features that minimises the MSE between two SAEs' folded parameters as a
linear assignment (`match`, `match_layers`), and evaluate it (`hf_ext.sae_match.metrics`).

Examples:
    >>> from hf_ext.sae_match import load_sae, match
    >>> repo = "google/gemma-scope-2b-pt-res"
    >>> sae_a = load_sae(repo, "layer_11/width_16k/average_l0_80")  # doctest: +SKIP
    >>> sae_b = load_sae(repo, "layer_12/width_16k/average_l0_82")  # doctest: +SKIP
    >>> matching = match(sae_a, sae_b, method="sparse")  # doctest: +SKIP
"""

import importlib

# The names resolve on first use so that `hf_ext.sae_match.cli` (imported by `hf-ext --help`)
# does not pull in torch and scipy.
_NAME_TO_MODULE = {
    "SparseAutoencoder": "sae",
    "fold": "sae",
    "permute_features": "sae",
    "load_sae": "formats",
    "save_sae": "formats",
    "Matching": "matching",
    "LayerMatchings": "matching",
    "match": "matching",
    "match_layers": "matching",
    "collect_hidden_states": "metrics",
    "delta_lm_loss": "metrics",
    "encode_permute_decode": "metrics",
    "evaluate_approximation": "metrics",
    "folded_mse": "metrics",
    "matching_score": "metrics",
    "plot_persistence": "plots",
}


def __getattr__(name: str):
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_ext.sae_match' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_NAME_TO_MODULE)
