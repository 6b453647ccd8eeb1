"""A small sparse autoencoder that reproduces the encode / decode of the formats people publish.

Layout (Gemma Scope's, also SAELens'): ``W_enc [d_model, n_features]``, ``b_enc [n_features]``,
``W_dec [n_features, d_model]``, ``b_dec [d_model]``, and for JumpReLU ``threshold [n_features]``.

    encode(x) = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    decode(f) = f @ W_dec + b_dec

with ``act`` one of

- ``"jumprelu"``: ReLU(z) * [z > threshold] (Gemma Scope, SAELens ``jumprelu``);
- ``"relu"``: ReLU(z) (SAELens ``standard``);
- ``"topk"``: keep the ``k`` largest of ReLU(z), zero the rest (EleutherAI sparsify, SAELens ``topk``).

`fold` is Eq. 4 of "Mechanistic Permutability: Match Features Across Layers" (arXiv 2410.07656):
the thresholds move into the weights so that features of different layers can be compared.
"""

import torch
from torch import nn

ACTIVATIONS = ("jumprelu", "relu", "topk")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ValueError(
            f"`{name}` has {int(bad.sum())} non-finite value(s) (NaN or inf) out of {tensor.numel()}; "
            "SAE weights must be finite."
        )


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder with JumpReLU, ReLU or TopK activation.

    Args:
        W_enc: encoder weight, ``[d_model, n_features]``.
        b_enc: encoder bias, ``[n_features]``.
        W_dec: decoder weight, ``[n_features, d_model]`` (one row a feature).
        b_dec: decoder bias, ``[d_model]``.
        activation: ``"jumprelu"``, ``"relu"`` or ``"topk"``.
        threshold: the JumpReLU thresholds ``theta``, ``[n_features]``; required for (and only for) ``"jumprelu"``.
        k: the number of features kept by ``"topk"``; required for (and only for) ``"topk"``.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens' default and
            sparsify's; Gemma Scope's params.npz does not).
        metadata: free-form facts from the source files (format, hook name, ...), kept for reports.

    Raises:
        ValueError: shapes disagree, a weight is NaN/inf, or the activation and its arguments do not fit.

    Examples:
        >>> import torch
        >>> from hf_ext.sae_match import SparseAutoencoder
        >>> sae = SparseAutoencoder(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2),
        ...                         activation="jumprelu", threshold=torch.tensor([0.5, 0.5]))
        >>> sae.encode(torch.tensor([[1.0, 0.2]]))
        tensor([[1., 0.]])
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        activation: str = "jumprelu",
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = False,
        metadata: dict | None = None,
    ):
        super().__init__()
        _check_arguments(W_enc, b_enc, W_dec, b_dec, activation, threshold, k)
        # The tensors are used as given (not copied): wide SAEs are large.
        self.W_enc = nn.Parameter(W_enc.detach(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.detach(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach(), requires_grad=False)
        if threshold is not None:
            self.threshold = nn.Parameter(threshold.detach(), requires_grad=False)
        else:
            self.threshold = None
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = dict(metadata or {})

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec?) @ W_enc + b_enc``: ``[..., d_model] -> [..., n_features]``."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., n_features]`` of inputs ``[..., d_model]``."""
        pre = self.pre_activation(x)
        z = torch.relu(pre)
        if self.activation == "jumprelu":
            return z * (pre > self.threshold).to(z.dtype)  # ReLU(pre) * H(pre - theta)
        if self.activation == "topk":
            values, indices = z.topk(self.k, dim=-1)
            return torch.zeros_like(z).scatter_(-1, indices, values)
        return z

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_model]`` of feature activations ``[..., n_features]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        return f"d_model={self.d_model}, n_features={self.n_features}, activation={self.activation!r}{extra}"


def _check_arguments(W_enc, b_enc, W_dec, b_dec, activation, threshold, k) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}.")
    for name, tensor in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), ("threshold", threshold)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if W_enc.ndim != 2:
        raise ValueError(f"`W_enc` must be [d_model, n_features], got shape {tuple(W_enc.shape)}.")
    d_model, n_features = W_enc.shape
    expected = {"b_enc": (n_features,), "W_dec": (n_features, d_model), "b_dec": (d_model,)}
    if threshold is not None:
        expected["threshold"] = (n_features,)
    given = {"b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(
                f"`{name}` has shape {tuple(given[name].shape)}, expected {shape} for W_enc of shape {tuple(W_enc.shape)} "
                "([d_model, n_features])."
            )
    if activation == "jumprelu" and threshold is None:
        raise ValueError("`activation`='jumprelu' needs `threshold` ([n_features]).")
    if activation != "jumprelu" and threshold is not None:
        raise ValueError(f"`threshold` is only used by activation='jumprelu', got activation={activation!r}.")
    if activation == "topk":
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_features:
            raise ValueError(f"`k` must be an int in [1, {n_features}] for activation='topk', got {k!r}.")
    elif k is not None:
        raise ValueError(f"`k` is only used by activation='topk', got activation={activation!r}.")
    for name, tensor in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), ("threshold", threshold)):
        if tensor is not None:
            _check_finite(name, tensor)


def fold_scale(sae: SparseAutoencoder) -> torch.Tensor:
    """The per-feature thresholds ``theta`` that `fold` divides out, ``[n_features]``, after checking them.

    Raises:
        ValueError: the SAE has no thresholds (ReLU/TopK) or a threshold is not strictly positive.
    """
    if sae.activation != "jumprelu" or sae.threshold is None:
        raise ValueError(
            f"`fold` needs a JumpReLU SAE with thresholds; this SAE has activation={sae.activation!r} and no "
            "threshold. Folding is only defined for JumpReLU (match ReLU/TopK SAEs with fold=False)."
        )
    theta = sae.threshold.detach()
    if not bool((theta > 0).all()):
        bad = int((theta <= 0).sum())
        raise ValueError(f"`fold` needs strictly positive thresholds; {bad} of {theta.numel()} are <= 0.")
    return theta


def fold(sae: SparseAutoencoder) -> SparseAutoencoder:
    """Fold the JumpReLU thresholds into the weights (Eq. 4 of arXiv 2410.07656).

    Per feature ``i`` with threshold ``theta_i > 0``::

        W_enc[:, i] /= theta_i,   b_enc[i] /= theta_i,   W_dec[i, :] *= theta_i,   theta_i = 1

    Since JumpReLU(z) = z * [z > theta] is positively homogeneous in (z, theta), the folded SAE
    encodes to ``f_i / theta_i`` and decodes to the same reconstruction. (The paper's Eq. 4 writes
    ``b_dec`` where ``b_enc`` is meant; ``b_dec`` is unchanged.)

    Args:
        sae: a JumpReLU SAE with strictly positive thresholds. It is not modified.

    Returns:
        A new `SparseAutoencoder` with ``threshold == 1``.

    Raises:
        ValueError: the SAE has no thresholds (ReLU/TopK) or a threshold is not strictly positive.

    Examples:
        >>> import torch
        >>> from hf_ext.sae_match import SparseAutoencoder, fold
        >>> sae = SparseAutoencoder(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2),
        ...                         threshold=torch.tensor([0.5, 2.0]))
        >>> fold(sae).W_dec
        Parameter containing:
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]])
    """
    theta = fold_scale(sae)
    return SparseAutoencoder(
        sae.W_enc / theta[None, :],
        sae.b_enc / theta,
        sae.W_dec * theta[:, None],
        sae.b_dec,
        activation="jumprelu",
        threshold=torch.ones_like(theta),
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
        metadata={**sae.metadata, "folded": True},
    )


def permute_features(sae: SparseAutoencoder, permutation: torch.Tensor) -> SparseAutoencoder:
    """The same SAE with its features reordered: new feature ``j`` is old feature ``permutation[j]``.

    Encode-decode is unchanged; the activations are permuted, ``new.encode(x) == old.encode(x)[..., permutation]``.
    """
    n = sae.n_features
    permutation = torch.as_tensor(permutation, device=sae.W_enc.device).long()
    if permutation.shape != (n,) or not torch.equal(permutation.sort().values, torch.arange(n, device=permutation.device)):
        raise ValueError(f"`permutation` must be a permutation of range({n}), got shape {tuple(permutation.shape)}.")
    return SparseAutoencoder(
        sae.W_enc[:, permutation],
        sae.b_enc[permutation],
        sae.W_dec[permutation],
        sae.b_dec,
        activation=sae.activation,
        threshold=None if sae.threshold is None else sae.threshold[permutation],
        k=sae.k,
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
        metadata=sae.metadata,
    )


__all__ = ["ACTIVATIONS", "SparseAutoencoder", "fold", "fold_scale", "permute_features"]
