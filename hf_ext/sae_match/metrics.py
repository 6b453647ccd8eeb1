"""How good a matching is: folded MSE, hidden-state approximation (FVU), Matching Score and delta-L.

Encode-permute-decode (Eq. 5 of arXiv 2410.07656) approximates the hidden state of layer ``t + 1``
from that of layer ``t``::

    f = encode_t(x_t);   f_hat[pi(i)] = f[i];   x_hat_{t+1} = decode_{t+1}(f_hat)

It is scored by the fraction of variance unexplained, ``FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``,
and explained variance ``1 - FVU`` (the paper prints ``Var(x_hat - x) / Var(x)``, i.e. FVU, under the
name "explained variance"; both are reported here), and by delta-L, the change in LM loss when layer
``t + 1``'s hidden state is replaced by ``x_hat``.

Hidden states are those of the model's decoder layers: index ``L`` is the output of decoder layer
``L`` (Gemma Scope's ``layer_L``, TransformerLens' ``blocks.L.hook_resid_post``), read with forward hooks.
"""

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from hf_ext.sae_match.matching import Matching, _check_pair, feature_vectors
from hf_ext.sae_match.sae import SparseAutoencoder


def _as_permutation(matching: Matching | torch.Tensor, n_features: int) -> torch.Tensor:
    permutation = matching.permutation if isinstance(matching, Matching) else torch.as_tensor(matching)
    if permutation.shape != (n_features,):
        raise ValueError(f"the matching has shape {tuple(permutation.shape)}, expected ({n_features},).")
    return permutation.long()


def folded_mse(
    sae_a: SparseAutoencoder, sae_b: SparseAutoencoder, matching: Matching | torch.Tensor, using: Sequence[str] = ("decoder",)
) -> float:
    """Mean over features and coordinates of ``(a_i - b_pi(i))^2`` on the folded SAEs' vectors.

    JumpReLU SAEs are folded first (whatever the matching was computed on), so matchings with and
    without folding are compared on one scale, as in the paper's Fig. 5.
    """
    _check_pair(sae_a, sae_b)
    permutation = _as_permutation(matching, sae_a.n_features)
    a = feature_vectors(sae_a, using, fold=sae_a.activation == "jumprelu")
    b = feature_vectors(sae_b, using, fold=sae_b.activation == "jumprelu")
    return float((a - b[permutation.to(b.device)]).double().square().mean())


def encode_permute_decode(
    sae_a: SparseAutoencoder, sae_b: SparseAutoencoder, matching: Matching | torch.Tensor, x_a: torch.Tensor
) -> torch.Tensor:
    """Eq. 5: ``decode_b(P encode_a(x_a))``, the approximation of layer ``b``'s hidden state, ``[..., d_model]``.

    The SAEs are used as given; pass ``fold(sae)`` to use the folded parametrisation (with folding,
    activations are measured in units of each feature's threshold).
    """
    _check_pair(sae_a, sae_b)
    permutation = _as_permutation(matching, sae_a.n_features).to(x_a.device)
    f = sae_a.encode(x_a)
    f_hat = torch.zeros_like(f).index_copy_(-1, permutation, f)  # f_hat[..., pi(i)] = f[..., i]
    return sae_b.decode(f_hat)


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over tokens ``[N, d]`` (mean over tokens)."""
    x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double()
    return float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())


def evaluate_approximation(
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    matching: Matching | torch.Tensor,
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
) -> dict[str, float]:
    """FVU and explained variance (1 - FVU) of encode-permute-decode from ``hidden_a`` to ``hidden_b``.

    Args:
        sae_a, sae_b: the SAEs of layers ``t`` and ``t + 1``.
        matching: a `Matching` from ``sae_a`` to ``sae_b`` (or its permutation).
        hidden_a, hidden_b: hidden states of the same tokens at layers ``t`` and ``t + 1``, ``[N, d_model]``.

    Returns:
        ``{"fvu": ..., "explained_variance": ...}``.
    """
    if hidden_a.shape != hidden_b.shape:
        raise ValueError(f"`hidden_a` {tuple(hidden_a.shape)} and `hidden_b` {tuple(hidden_b.shape)} must have the same shape.")
    with torch.no_grad():
        x_hat = encode_permute_decode(sae_a, sae_b, matching, hidden_a)
    fvu = fraction_of_variance_unexplained(hidden_b, x_hat)
    return {"fvu": fvu, "explained_variance": 1.0 - fvu}


def matching_score(
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    matching: Matching | torch.Tensor,
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
) -> float:
    """The Matching Score: how often matched features fire together.

    Defined here as ``P(f^b_pi(i) > 0 | f^a_i > 0)``, pooled over tokens and features: of all the
    times a feature of layer ``t`` fires, the fraction in which its match in layer ``t + 1`` fires on
    the same token. (The paper names the metric without a formula; this reading is ours.)
    """
    _check_pair(sae_a, sae_b)
    permutation = _as_permutation(matching, sae_a.n_features).to(hidden_a.device)
    with torch.no_grad():
        fires_a = sae_a.encode(hidden_a.reshape(-1, sae_a.d_model)) > 0
        fires_b = sae_b.encode(hidden_b.reshape(-1, sae_b.d_model))[:, permutation] > 0
    fired = fires_a.sum()
    if fired == 0:
        raise ValueError("no feature of `sae_a` fires on `hidden_a`; the Matching Score is undefined.")
    return float((fires_a & fires_b).sum() / fired)


# ---------------------------------------------------------------------------------------------
# Hidden states and delta-L from a model
# ---------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the ``ModuleList`` with ``config.num_hidden_layers`` entries."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the {n_layers} decoder layers of {type(model).__name__}.")


def _output_hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _hooks(layers: nn.ModuleList, hooks: dict[int, callable]):
    handles = [layers[index].register_forward_hook(fn) for index, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, device):
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield {k: v.to(device) for k, v in batch.items()}


def _token_mask(batch: dict, tokenizer) -> torch.Tensor:
    """Tokens that count: not padding, and not BOS (excluded in the paper: its hidden state is an outlier)."""
    mask = batch["attention_mask"].bool()
    if tokenizer.bos_token_id is not None:
        mask &= batch["input_ids"] != tokenizer.bos_token_id
    return mask


def _check_layers(model, layers: Sequence[int]) -> nn.ModuleList:
    modules = decoder_layers(model)
    for layer in layers:
        if not 0 <= layer < len(modules):
            raise ValueError(f"layer {layer} is out of range: the model has {len(modules)} decoder layers.")
    return modules


@torch.no_grad()
def collect_hidden_states(
    model, tokenizer, texts: Sequence[str], layers: Sequence[int], *, batch_size: int = 8, max_length: int = 1024
) -> dict[int, torch.Tensor]:
    """The outputs of the given decoder layers on ``texts``, as ``{layer: [N, d_model]}`` (pad and BOS tokens dropped)."""
    modules = _check_layers(model, layers)
    device = next(model.parameters()).device
    collected = {layer: [] for layer in layers}
    captured = {}  # this batch's outputs, by layer
    hooks = {layer: (lambda m, i, o, layer=layer: captured.__setitem__(layer, _output_hidden(o))) for layer in layers}
    with _hooks(modules, hooks):
        for batch in _batches(tokenizer, texts, batch_size, max_length, device):
            model(**batch)
            mask = _token_mask(batch, tokenizer)
            for layer in layers:
                collected[layer].append(captured[layer][mask].float().cpu())
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


def _masked_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over non-padding targets (the callers divide by the token count)."""
    targets = batch["input_ids"][:, 1:].masked_fill(~batch["attention_mask"][:, 1:].bool(), -100)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def delta_lm_loss(
    model,
    tokenizer,
    texts: Sequence[str],
    layer: int,
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    matching: Matching | torch.Tensor,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict[str, float]:
    """delta-L: the change in LM loss when layer ``layer + 1``'s output is replaced by encode-permute-decode.

    In one forward pass a hook reads the output ``x_t`` of decoder layer ``layer`` and the next layer's
    hook returns ``decode_b(P encode_a(x_t))`` in place of its own output (BOS and padding positions
    keep their original hidden states).

    Args:
        model: a causal LM (transformers ``...ForCausalLM``).
        tokenizer: its tokenizer (with a pad token).
        texts: the evaluation texts.
        layer: ``t``, the layer ``sae_a`` reads; ``sae_b`` reads layer ``t + 1``.
        sae_a, sae_b, matching: as in `encode_permute_decode`.
        batch_size, max_length: tokenisation.

    Returns:
        ``{"loss": clean loss, "patched_loss": loss with the approximation, "delta_loss": their difference}``
        (mean next-token cross-entropy in nats over non-padding tokens).
    """
    modules = _check_layers(model, [layer, layer + 1])
    _check_pair(sae_a, sae_b)
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "patched_loss": 0.0}
    n_tokens = 0
    state = {}  # this batch's token mask and layer `layer`'s output

    def read(module, inputs, output):
        state["x_a"] = _output_hidden(output)

    def replace(module, inputs, output):
        hidden = _output_hidden(output)
        x_hat = encode_permute_decode(sae_a, sae_b, matching, state["x_a"].to(sae_a.W_enc.dtype)).to(hidden.dtype)
        return _with_hidden(output, torch.where(state["mask"][..., None], x_hat, hidden))

    for batch in _batches(tokenizer, texts, batch_size, max_length, device):
        state["mask"] = _token_mask(batch, tokenizer)
        totals["loss"] += float(_masked_lm_loss(model(**batch).logits, batch))
        with _hooks(modules, {layer: read, layer + 1: replace}):
            totals["patched_loss"] += float(_masked_lm_loss(model(**batch).logits, batch))
        n_tokens += int(batch["attention_mask"][:, 1:].sum())
    loss, patched = totals["loss"] / n_tokens, totals["patched_loss"] / n_tokens
    return {"loss": loss, "patched_loss": patched, "delta_loss": patched - loss}


__all__ = [
    "collect_hidden_states",
    "decoder_layers",
    "delta_lm_loss",
    "encode_permute_decode",
    "evaluate_approximation",
    "folded_mse",
    "fraction_of_variance_unexplained",
    "matching_score",
]
