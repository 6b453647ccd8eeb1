"""Plots of a chain of SAE Match matchings (arXiv 2410.07656); matplotlib is imported only when a plot is drawn."""

import os

from hf_ext.sae_match.matching import LayerMatchings


def plot_persistence(chain: LayerMatchings, threshold: float, path: str | os.PathLike | None = None):
    """Two panels: the median matching cost of each layer pair, and how many layers features survive.

    Args:
        chain: matchings of consecutive layers (`match_layers`).
        threshold: a match with a cost below it counts as the feature surviving (see
            `LayerMatchings.persistence`); drawn as a line on the left panel.
        path: save the figure there as PNG when given.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    survive = chain.persistence(threshold).cpu()
    fig, (ax_cost, ax_surv) = plt.subplots(1, 2, figsize=(10, 3.8))
    pairs = range(len(chain.matchings))
    medians = [float(m.cost.float().median()) for m in chain.matchings]
    q90 = [float(m.cost.float().quantile(0.9)) for m in chain.matchings]
    ax_cost.plot(pairs, medians, marker="o", label="median")
    ax_cost.plot(pairs, q90, marker=".", linestyle="--", label="90th percentile")
    ax_cost.axhline(threshold, color="grey", linewidth=0.8, label="threshold")
    ax_cost.set_xticks(list(pairs))
    ax_cost.set(xlabel="layer pair l -> l+1", ylabel="per-feature MSE", title="matching cost", yscale="log")
    ax_cost.legend()
    n_layers = survive.shape[0]
    lengths = range(0, n_layers)
    n_curves = min(8, n_layers - 1)  # a few evenly spaced start layers keep the legend readable
    starts = sorted({round(i * (n_layers - 2) / max(1, n_curves - 1)) for i in range(n_curves)})
    for start in starts:
        frac = [float((survive[start] >= s).float().mean()) for s in lengths[: n_layers - start]]
        ax_surv.plot(lengths[: n_layers - start], frac, marker=".", label=f"from layer {start}")
    ax_surv.set(xlabel="layers survived", ylabel="fraction of features", title=f"persistence (cost < {threshold:g})", ylim=(0, 1.02))
    ax_surv.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


__all__ = ["plot_persistence"]
