"""SAE Match: the permutation of features that best aligns two SAEs (arXiv 2410.07656, Sec. 3).

For SAEs A and B with per-feature vectors ``a_i`` and ``b_j`` (decoder rows, optionally with encoder
columns and ``b_enc``, all after folding), SAE Match solves

    pi* = argmin_pi  sum_i ||a_i - b_pi(i)||^2 / D                                       (Eq. 3)

a linear assignment problem: since pi is a bijection, ``sum ||b_pi(i)||^2`` does not depend on pi and
the problem is ``argmax_pi sum_i <a_i, b_pi(i)>`` (as in Git Re-Basin).

Two solvers:

- ``"exact"``: the dense cost matrix ``(||a_i||^2 + ||b_j||^2 - 2 <a_i, b_j>) / D``, computed block by
  block with float32 matrix products straight into the float64 array SciPy's
  ``linear_sum_assignment`` works on (so SciPy makes no copy); ``n^2 * 8`` bytes.
- ``"sparse"``: for wide SAEs. For each feature of A its ``k`` nearest partners in B, and for each
  feature of B its ``k`` nearest in A, ranked block by block with bfloat16 products (the
  ``n x n`` matrix is never held); the costs of these candidate edges are then recomputed in float32,
  and a min-cost full matching is found on that graph (``min_weight_full_bipartite_matching``). A
  fallback keeps the graph matchable: a first matching of the candidate graph may leave a feature out
  at the cost of pairing it with an orthogonal partner; the features left out (typically those with no
  counterpart) are paired among themselves (the same method on that smaller problem), and those
  edges join the graph.
  Exact: the float32 costs of the edges and the optimum on the graph. Approximate: which edges the
  graph holds (the bfloat16 ranking, ``k``) and so how close that optimum comes to the dense one.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from hf_ext.sae_match.sae import SparseAutoencoder, fold_scale

PARTS = ("decoder", "encoder")
METHODS = ("exact", "sparse")


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of the features of SAE A to those of SAE B.

    Args:
        permutation: ``[n]`` long; feature ``i`` of A is matched to feature ``permutation[i]`` of B.
        cost: ``[n]`` float32; the per-feature MSE ``||a_i - b_permutation[i]||^2 / D`` of the vectors matched.
        using: the parts the vectors were built from (``"decoder"``, ``"encoder"``).
        method: the solver (``"exact"`` or ``"sparse"``).
        folded: whether JumpReLU thresholds were folded in first.
    """

    permutation: torch.Tensor
    cost: torch.Tensor
    using: tuple[str, ...] = ("decoder",)
    method: str = "exact"
    folded: bool = True

    @property
    def total(self) -> float:
        """The objective: the sum of the per-feature costs."""
        return float(self.cost.double().sum())

    @property
    def n_features(self) -> int:
        return self.permutation.numel()

    def agreement(self, other: "Matching") -> float:
        """The fraction of features of A that ``other`` matches to the same feature of B."""
        return float((self.permutation == other.permutation.to(self.permutation.device)).double().mean())

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (``permutation``, ``cost``; the rest in its metadata)."""
        _atomic_save({"permutation": self.permutation, "cost": self.cost}, path, self._metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Matching":
        """Read a file written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return cls(f.get_tensor("permutation"), f.get_tensor("cost"), **_parse_metadata(meta))

    def _metadata(self) -> dict[str, str]:
        return {"using": json.dumps(list(self.using)), "method": self.method, "folded": json.dumps(self.folded)}


def _parse_metadata(meta: dict[str, str]) -> dict:
    return {"using": tuple(json.loads(meta["using"])), "method": meta["method"], "folded": json.loads(meta["folded"])}


def _atomic_save(tensors: dict, path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from hf_ext.atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Feature vectors and costs
# ---------------------------------------------------------------------------------------------


def feature_vectors(sae: SparseAutoencoder, using: Sequence[str] = ("decoder",), fold: bool = False) -> torch.Tensor:
    """The per-feature vectors that SAE Match compares, ``[n_features, D]`` float32.

    ``"decoder"`` contributes ``W_dec[i, :]`` (d values); ``"encoder"`` contributes ``W_enc[:, i]`` and
    ``b_enc[i]`` (d + 1 values), as the paper matches W_dec, W_enc and b_enc together. With ``fold``
    (JumpReLU SAEs only) the parts are those of the folded SAE (Eq. 4), computed without copying the
    rest of the SAE.
    """
    theta = fold_scale(sae)[:, None] if fold else None
    parts = []
    for part in using:
        if part == "decoder":
            parts.append(sae.W_dec if theta is None else sae.W_dec * theta)
        else:
            enc = torch.cat([sae.W_enc.T, sae.b_enc[:, None]], dim=1)
            parts.append(enc if theta is None else enc / theta)
    parts = [p.detach().float() for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2`` per row, without a temporary copy of ``x``."""
    return torch.linalg.vector_norm(x, dim=1).square()


def _block_rows(n_columns: int, block_bytes: int) -> int:
    """Rows of a float32 ``[rows, n_columns]`` block that fit in ``block_bytes``."""
    return max(1, min(n_columns, block_bytes // (4 * n_columns)))


def _cost_block(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """``(||a_i||^2 + ||b_j||^2 - 2 <a_i, b_j>) / D`` for a block of rows of A, float32, clamped at 0.

    ``a_sq`` and ``b_sq`` are the squared norms already divided by ``D``; one fused matrix product
    and in-place updates keep a single ``[rows, n_b]`` buffer alive.
    """
    block = torch.addmm(b_sq[None, :], a, b.T, alpha=-2.0 / a.shape[1])
    return block.add_(a_sq[:, None]).clamp_min_(0.0)


def dense_cost_matrix(a: torch.Tensor, b: torch.Tensor, block_bytes: int = 256 * 2**20) -> np.ndarray:
    """The full ``[n_a, n_b]`` MSE cost matrix as a float64 numpy array, built in float32 blocks."""
    dim = a.shape[1]
    a_sq, b_sq = _squared_norms(a) / dim, _squared_norms(b) / dim
    cost = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    cost_t = torch.from_numpy(cost)  # shares memory: each block is widened straight into place
    step = _block_rows(b.shape[0], block_bytes)
    for start in range(0, a.shape[0], step):
        stop = min(start + step, a.shape[0])
        cost_t[start:stop].copy_(_cost_block(a[start:stop], b, a_sq[start:stop], b_sq).cpu())
    return cost


def _pair_costs(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``||a_rows - b_cols||^2 / D`` for given pairs, computed on differences (no cancellation).

    Small chunks keep the temporaries small (at ``D = 2304``, 9 MB each; fresh large ones cost page faults).
    """
    out = torch.empty(rows.numel(), dtype=torch.float32, device=a.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        out[s : s + chunk] = (a[r] - b[c]).square().mean(1)
    return out


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


def exact_assignment(a: torch.Tensor, b: torch.Tensor, block_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Columns matched to rows ``0..n-1`` by a dense LAP on the MSE cost (SciPy ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    cost = dense_cost_matrix(a, b, block_bytes)
    _, cols = linear_sum_assignment(cost)  # float64 and C-contiguous: SciPy solves in place, no copy
    return torch.from_numpy(cols).long()


def _candidate_dots(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, chunk_bytes: int = 2 * 2**20) -> torch.Tensor:
    """``<x_i, y_idx[i, j]>`` in float32 for ``[n, k]`` candidate indices, ``[n, k]``; exact float32 products.

    The candidate rows of ``y`` are gathered a few rows of ``x`` at a time into one small reused
    buffer that stays in cache, so each gathered row is read from memory once (a buffer larger than
    the cache is written out and read back, and a fresh one per chunk costs page faults).
    """
    n, k = idx.shape
    dim = x.shape[1]
    out = torch.empty(n, k, device=x.device)
    step = max(1, min(n, chunk_bytes // (4 * k * dim)))
    buffer = torch.empty(step * k, dim, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        gathered = torch.index_select(y, 0, idx[start:stop].flatten(), out=buffer[: (stop - start) * k])
        out[start:stop] = gathered.view(stop - start, k, dim).mul_(x[start:stop, None, :]).sum(2)
    return out


def _ranking_operands(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a_i, 1, -||a_i||^2 / 2]`` and ``[b_j, -||b_j||^2 / 2, 1]`` in ``dtype``: their products are ``-||a_i - b_j||^2 / 2``.

    Folding the norms into the product spares two passes over each block of scores.
    """
    dim = a.shape[1]
    a_aug = torch.empty(a.shape[0], dim + 2, dtype=dtype, device=a.device)
    b_aug = torch.empty(b.shape[0], dim + 2, dtype=dtype, device=b.device)
    a_aug[:, :dim], b_aug[:, :dim] = a, b
    a_aug[:, dim], b_aug[:, dim + 1] = 1.0, 1.0
    a_aug[:, dim + 1], b_aug[:, dim] = -_squared_norms(a) / 2, -_squared_norms(b) / 2
    return a_aug, b_aug


def _topk_by_group_maxima(scores: torch.Tensor, k: int, dim: int, groups: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries along ``dim`` of a 2-D block: ``(values, indices)``, each ``[scores.shape[1 - dim], k]``.

    Exact (up to the order of ties), and cheaper than ``topk`` straight on the block, above all down its
    columns: the entries along ``dim`` are cut into ``groups`` equal slices, and their elementwise
    maximum (a contiguous, vectorised pass) gives each position within a slice the largest of its
    ``groups`` entries. No entry exceeds its position's maximum, so the ``k`` positions with the largest
    maxima hold a top ``k``; ``topk`` then runs on the maxima and on those ``k * groups`` entries only.
    A length that does not split into ``groups`` slices of at least ``k`` takes the plain ``topk``.
    """
    length = scores.shape[dim]
    if length % groups or length // groups < k:
        values, indices = scores.topk(k, dim=dim)
        return (values, indices) if dim == 1 else (values.T, indices.T)
    span = length // groups
    if dim == 1:
        maxima = scores.view(-1, groups, span).amax(1)  # [rows, span]
    else:
        maxima = scores.view(groups, span, -1).amax(0).T  # [columns, span]
    positions = maxima.topk(k, dim=1).indices
    offsets = span * torch.arange(groups, device=scores.device)
    indices = (positions[:, :, None] + offsets).flatten(1)  # [*, k * groups]: indices along `dim`
    entries = scores.gather(1, indices) if dim == 1 else scores.gather(0, indices.T).T
    values, best = entries.topk(k, dim=1)
    return values, indices.gather(1, best)


def _ranked_candidates(
    a: torch.Tensor, b: torch.Tensor, k_row: int, k_col: int, block_bytes: int, rank_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each row's ``k_row`` nearest columns ``[n_a, k_row]`` and each column's ``k_col`` nearest rows ``[n_b, k_col]``.

    Ranked by ``-||a_i - b_j||^2 / 2 = <a_i, b_j> - ||a_i||^2 / 2 - ||b_j||^2 / 2`` (a plain inner
    product would favour long vectors), over blocks of rows of A, with the block products in
    ``rank_dtype`` written into one reused buffer (a fresh block per step costs page faults).
    """
    n_a, n_b = a.shape[0], b.shape[0]
    a_rank, b_rank = _ranking_operands(a, b, rank_dtype)
    row_idx = torch.empty(n_a, k_row, dtype=torch.long, device=a.device)
    col_val = torch.full((n_b, k_col), -torch.inf, device=a.device)  # running best rows of each column
    col_idx = torch.zeros(n_b, k_col, dtype=torch.long, device=a.device)
    step = _block_rows(n_b, block_bytes)
    buffer = torch.empty(step, n_b, dtype=rank_dtype, device=a.device)
    for start in range(0, n_a, step):
        stop = min(start + step, n_a)
        scores = torch.matmul(a_rank[start:stop], b_rank.T, out=buffer[: stop - start])  # -|a_i - b_j|^2 / 2
        row_idx[start:stop] = _topk_by_group_maxima(scores, k_row, dim=1)[1]
        val, idx = _topk_by_group_maxima(scores, min(k_col, stop - start), dim=0)
        merged_val, merged_idx = torch.cat([col_val, val.float()], dim=1), torch.cat([col_idx, idx + start], dim=1)
        keep = merged_val.topk(k_col, dim=1).indices
        col_val, col_idx = merged_val.gather(1, keep), merged_idx.gather(1, keep)
    return row_idx, col_idx


def topk_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    block_bytes: int = 256 * 2**20,
    rank_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate pairs: each row's ``k`` nearest columns and each column's ``k`` nearest rows.

    The ``n_a x n_b`` products, the bulk of the work, only rank: they are computed in blocks (only a
    ``[rows, n_b]`` block is held) in ``rank_dtype`` (bfloat16 by default, several times faster than
    float32 on CPUs with bf16 matrix units; its rounding only reorders near ties deep in a list of
    ``k``). The inner products of the candidate pairs that the matching then uses are recomputed
    exactly, in float32.

    Returns:
        ``(rows, cols, dots)``: the unique candidate pairs sorted by row then column, and their float32
        inner products ``<a_row, b_col>``; three ``[E]`` tensors.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    k_row, k_col = min(k, n_b), min(k, n_a)
    row_idx, col_idx = _ranked_candidates(a, b, k_row, k_col, block_bytes, rank_dtype)
    row_dot, col_dot = _candidate_dots(a, b, row_idx), _candidate_dots(b, a, col_idx)
    rows = torch.cat([torch.arange(n_a, device=a.device).repeat_interleave(k_row), col_idx.flatten()])
    cols = torch.cat([row_idx.flatten(), torch.arange(n_b, device=a.device).repeat_interleave(k_col)])
    keys, inverse = torch.unique(rows * n_b + cols, return_inverse=True)  # sorted, duplicates removed
    dots = torch.empty(keys.numel(), device=a.device).scatter_(0, inverse, torch.cat([row_dot.flatten(), col_dot.flatten()]))
    return keys // n_b, keys % n_b, dots


def _left_out(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns that the candidate graph matches no better than an orthogonal partner would.

    A min-cost perfect matching on the candidate graph, doubled so that any vertex may stay out: row
    ``i`` may take a private dummy column at cost ``||a_i||^2 / D`` and column ``j`` a private dummy row
    at cost ``||b_j||^2 / D`` (together, the cost ``||a_i||^2 / D + ||b_j||^2 / D - 2 <a_i, b_j> / D``
    of a pair with ``<a_i, b_j> = 0``); the dummies match each other along the mirrored candidate
    edges at cost 0. So features whose candidates are all taken by better pairs, such as features with
    no counterpart in the other SAE, stay out instead of breaking those pairs. Returns the ``m`` rows and
    the ``m`` columns left out, sorted.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n, dim = a.shape
    out_row, out_col = (_squared_norms(a).double() / dim).cpu().numpy(), (_squared_norms(b).double() / dim).cpu().numpy()
    every = np.arange(n)
    graph_rows = np.concatenate([rows, every, n + every, n + cols])
    graph_cols = np.concatenate([cols, n + every, every, n + rows])
    # +1: the solver reads a stored 0 as "no edge"; every perfect matching has 2n edges, so the optimum is unchanged
    graph_weights = np.concatenate([weights, out_row, out_col, np.zeros(rows.size)]) + 1.0
    _, matched = min_weight_full_bipartite_matching(csr_array((graph_weights, (graph_rows, graph_cols)), shape=(2 * n, 2 * n)))
    free_rows = np.flatnonzero(matched[:n] >= n)
    free_cols = np.sort(matched[n:][matched[n:] < n])  # real columns taken by dummy rows
    return free_rows, free_cols


def _completion_edges(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, a: torch.Tensor, b: torch.Tensor, k: int, block_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Edges that pair the features `_left_out` leaves out (the fallback), not already candidates.

    The ``m`` rows and ``m`` columns left out are paired among themselves: by `sparse_assignment` on
    that smaller problem (a dense LAP would take minutes for a few thousand features without
    counterparts, whose costs are all alike), or by a dense LAP when nothing was matched (``m = n``).
    With the candidate edges this keeps the graph perfectly matchable. ``m`` is 0 when every feature
    has a close counterpart, and about the number of features without one otherwise.
    """
    from scipy.optimize import linear_sum_assignment

    free_rows, free_cols = _left_out(rows, cols, weights, a, b)
    n = a.shape[0]
    if free_rows.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    sub_a, sub_b = a[torch.from_numpy(free_rows).to(a.device)], b[torch.from_numpy(free_cols).to(b.device)]
    if free_rows.size < n:
        pick = sparse_assignment(sub_a, sub_b, k, block_bytes).cpu().numpy()
    else:
        _, pick = linear_sum_assignment(dense_cost_matrix(sub_a, sub_b, block_bytes))
    extra_rows, extra_cols = free_rows, free_cols[pick]
    new = ~np.isin(extra_rows * n + extra_cols, rows * n + cols)  # a duplicate edge would add its weight twice
    return extra_rows[new], extra_cols[new]


def sparse_assignment(a: torch.Tensor, b: torch.Tensor, k: int = 8, block_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Columns matched to rows ``0..n-1`` by a min-cost full matching on the top-``k`` candidate graph."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n, dim = a.shape
    rows_t, cols_t, dots = topk_candidates(a, b, k, block_bytes)
    a_sq, b_sq = _squared_norms(a).double(), _squared_norms(b).double()
    weights = ((a_sq[rows_t] + b_sq[cols_t] - 2.0 * dots.double()) / dim).clamp_min(0.0).cpu().numpy()
    rows, cols = rows_t.cpu().numpy(), cols_t.cpu().numpy()
    extra_rows, extra_cols = _completion_edges(rows, cols, weights, a, b, k, block_bytes)
    if extra_rows.size:
        extra = torch.from_numpy(extra_rows).to(a.device), torch.from_numpy(extra_cols).to(a.device)
        rows, cols = np.concatenate([rows, extra_rows]), np.concatenate([cols, extra_cols])
        weights = np.concatenate([weights, _pair_costs(a, b, *extra).double().cpu().numpy()])
    # The solver reads a stored 0 as "no edge"; shifting every weight by the same constant changes
    # every full matching's total by the same amount, so the optimum is unchanged.
    weights += 1.0 - weights.min()
    graph = csr_array((weights, (rows, cols)), shape=(n, n))
    _, matched = min_weight_full_bipartite_matching(graph)
    return torch.from_numpy(matched).long()


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _check_pair(sae_a, sae_b) -> None:
    for name, sae in (("sae_a", sae_a), ("sae_b", sae_b)):
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"`{name}` must be a SparseAutoencoder (see load_sae), got {type(sae).__name__}.")
    if sae_a.d_model != sae_b.d_model:
        raise ValueError(
            f"d_model mismatch: `sae_a` reads {sae_a.d_model}-dimensional hidden states and `sae_b` {sae_b.d_model}; "
            "SAE Match compares SAEs of the same model."
        )
    if sae_a.n_features != sae_b.n_features:
        raise ValueError(
            f"n_features mismatch: `sae_a` has {sae_a.n_features} features and `sae_b` {sae_b.n_features}; "
            "a one-to-one matching needs SAEs of the same width."
        )


def _check_options(using, method, k) -> tuple[str, ...]:
    if isinstance(using, str):
        using = (using,)
    using = tuple(using)
    if not using or any(part not in PARTS for part in using) or len(set(using)) != len(using):
        raise ValueError(f"`using` must be a non-empty tuple of distinct parts from {PARTS}, got {using!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    return using


def match(
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    using: Sequence[str] = ("decoder",),
    method: str = "exact",
    *,
    fold: bool = True,
    k: int = 8,
    block_bytes: int = 256 * 2**20,
) -> Matching:
    """Match the features of ``sae_a`` to those of ``sae_b`` (SAE Match, arXiv 2410.07656).

    Args:
        sae_a: the SAE of the earlier layer.
        sae_b: the SAE of the later layer (same ``d_model`` and width).
        using: the parts compared: ``("decoder",)`` (the default; about as good as all parts, Fig. 12)
            or ``("encoder", "decoder")`` (W_enc, b_enc and W_dec together, as in the paper's experiments).
        method: ``"exact"`` (dense LAP, ``n^2 * 8`` bytes) or ``"sparse"`` (top-``k`` candidate graph,
            ranked with bfloat16 products and costed exactly in float32; for wide SAEs, memory
            ``O(n * k)`` plus one block; only if the fallback meets ``m`` features among which no
            candidate beats an orthogonal partner does it pair them densely, ``m^2 * 8`` bytes).
        fold: fold JumpReLU thresholds into the weights first (Eq. 4; the paper's setting). SAEs
            without thresholds (ReLU, TopK) are compared as they are.
        k: candidates per feature for ``method="sparse"`` (from each side; 8 recovers planted pairs as
            well as 32, at less than half the time).
        block_bytes: the size of the float32 score blocks.

    Returns:
        A `Matching`.

    Raises:
        TypeError: an SAE is not a `SparseAutoencoder`.
        ValueError: d_model or width mismatch, or a bad ``using`` / ``method`` / ``k``.

    Examples:
        >>> from hf_ext.sae_match import match
        >>> from hf_ext.sae_match.synthetic import planted_pair
        >>> sae_a, sae_b, truth = planted_pair(n_features=64, d_model=16, seed=0)
        >>> m = match(sae_a, sae_b)
        >>> bool((m.permutation == truth).all())
        True
    """
    _check_pair(sae_a, sae_b)
    using = _check_options(using, method, k)
    a = feature_vectors(sae_a, using, fold=fold and sae_a.activation == "jumprelu")
    b = feature_vectors(sae_b, using, fold=fold and sae_b.activation == "jumprelu").to(a.device)
    if method == "exact":
        permutation = exact_assignment(a, b, block_bytes)
    else:
        permutation = sparse_assignment(a, b, k, block_bytes)
    permutation = permutation.to(a.device)
    cost = _pair_costs(a, b, torch.arange(a.shape[0], device=a.device), permutation)
    folded = fold and (sae_a.activation == "jumprelu" or sae_b.activation == "jumprelu")
    return Matching(permutation=permutation, cost=cost, using=using, method=method, folded=folded)


@dataclass(frozen=True)
class LayerMatchings:
    """Matchings between consecutive SAEs ``0 -> 1 -> ... -> L``, and what follows from chaining them.

    Args:
        matchings: ``L`` matchings; ``matchings[l]`` maps features of SAE ``l`` to SAE ``l + 1``.
    """

    matchings: list[Matching]

    @property
    def n_layers(self) -> int:
        """The number of SAEs chained (one more than the number of matchings)."""
        return len(self.matchings) + 1

    def compose(self, start: int, stop: int) -> torch.Tensor:
        """pi(start -> stop) = pi(stop-1 -> stop) o ... o pi(start -> start+1), ``[n]`` long (Sec. 3.3).

        Feature ``i`` of SAE ``start`` is followed to feature ``compose(start, stop)[i]`` of SAE ``stop``.
        """
        if not 0 <= start <= stop < self.n_layers:
            raise ValueError(f"`start` and `stop` must satisfy 0 <= start <= stop < {self.n_layers}, got {start}, {stop}.")
        perm = torch.arange(self.matchings[0].n_features, device=self.matchings[0].permutation.device)
        for matching in self.matchings[start:stop]:
            perm = matching.permutation[perm]
        return perm

    def feature_paths(self, start: int = 0) -> torch.Tensor:
        """``[n, n_layers - start]`` long: row ``i`` is the index of feature ``i`` of SAE ``start`` in each later SAE."""
        steps = [self.compose(start, stop) for stop in range(start, self.n_layers)]
        return torch.stack(steps, dim=1)

    def path_costs(self, start: int = 0) -> torch.Tensor:
        """``[n, n_layers - 1 - start]``: the cost of each step of each feature path from SAE ``start``."""
        paths = self.feature_paths(start)
        return torch.stack([self.matchings[start + s].cost[paths[:, s]] for s in range(paths.shape[1] - 1)], dim=1)

    def persistence(self, threshold: float) -> torch.Tensor:
        """How many layers each feature survives: ``[n_layers, n]`` long.

        Entry ``[l, i]`` counts the consecutive matching steps from feature ``i`` of SAE ``l`` onward whose
        cost stays below ``threshold`` (0: its match in layer ``l + 1`` is already too far; the last
        layer is always 0).
        """
        if not threshold > 0:
            raise ValueError(f"`threshold` must be > 0, got {threshold!r}.")
        n = self.matchings[0].n_features
        device = self.matchings[0].permutation.device
        survive = [torch.zeros(n, dtype=torch.long, device=device)]
        for matching in reversed(self.matchings):  # survive[l] = [cost_l < t] * (1 + survive[l+1][pi_l])
            next_survive = survive[0]
            survive.insert(0, (matching.cost < threshold).long() * (1 + next_survive[matching.permutation]))
        return torch.stack(survive)

    def save(self, path: str | os.PathLike) -> None:
        """Write all matchings to one safetensors file (keys ``"{l}.permutation"``, ``"{l}.cost"``)."""
        tensors, meta = {}, {}
        for layer, matching in enumerate(self.matchings):
            tensors[f"{layer}.permutation"], tensors[f"{layer}.cost"] = matching.permutation, matching.cost
            meta[str(layer)] = json.dumps(matching._metadata())
        _atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerMatchings":
        """Read a file written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return cls([
                Matching(f.get_tensor(f"{i}.permutation"), f.get_tensor(f"{i}.cost"), **_parse_metadata(json.loads(meta[str(i)])))
                for i in range(len(meta))
            ])


def match_layers(
    saes: Sequence[SparseAutoencoder],
    using: Sequence[str] = ("decoder",),
    method: str = "exact",
    *,
    fold: bool = True,
    k: int = 8,
    block_bytes: int = 256 * 2**20,
    progress: bool = False,
) -> LayerMatchings:
    """Match each SAE to the next: ``saes[0] -> saes[1] -> ... -> saes[L]``.

    Args:
        saes: at least two SAEs of consecutive layers (same ``d_model`` and width).
        using, method, fold, k, block_bytes: as in `match`.
        progress: show a progress bar.

    Returns:
        `LayerMatchings`, with composed permutations, feature paths and persistence.

    Examples:
        >>> from hf_ext.sae_match import match_layers
        >>> from hf_ext.sae_match.synthetic import planted_chain
        >>> saes, truths = planted_chain(n_layers=3, n_features=64, d_model=16, seed=0)
        >>> chain = match_layers(saes)
        >>> bool((chain.compose(0, 2) == truths[1][truths[0]]).all())
        True
    """
    if len(saes) < 2:
        raise ValueError(f"`saes` must hold at least two SAEs, got {len(saes)}.")
    _check_options(using, method, k)
    for left, right in pairwise(saes):
        _check_pair(left, right)
    from tqdm.auto import tqdm

    pairs = tqdm(range(len(saes) - 1), desc="matching layers", disable=not progress)
    return LayerMatchings([
        match(saes[i], saes[i + 1], using, method, fold=fold, k=k, block_bytes=block_bytes) for i in pairs
    ])


__all__ = [
    "LayerMatchings",
    "METHODS",
    "Matching",
    "PARTS",
    "dense_cost_matrix",
    "exact_assignment",
    "feature_vectors",
    "match",
    "match_layers",
    "sparse_assignment",
    "topk_candidates",
]
