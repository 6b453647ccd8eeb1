"""Reading and writing the SAE file formats people publish, as `SparseAutoencoder` objects.

==============  ==========================================  ==================================================
format          files in the SAE's folder                   weights
==============  ==========================================  ==================================================
``gemma_scope`` ``params.npz``                              ``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc``,
                                                            ``b_dec``, ``threshold`` (JumpReLU, no ``b_dec``
                                                            subtracted from the input)
``saelens``     ``cfg.json`` + ``sae_weights.safetensors``  the same names; ``cfg.architecture`` is
                                                            ``standard`` (ReLU), ``jumprelu`` or ``topk``
``sparsify``    ``cfg.json`` + ``sae.safetensors``          ``encoder.weight [F, d]``, ``encoder.bias``,
                                                            ``W_dec [F, d]``, ``b_dec``; TopK(ReLU(.)) with ``k``
==============  ==========================================  ==================================================

SAELens folders are read as SAELens 6 reads them, whether its training runner wrote them at the end
(``save_inference_model``) or as a training checkpoint (``save_model``), and whether SAELens 6 or an
earlier version wrote them:

- ``standard``, ``jumprelu`` (``threshold`` or a training checkpoint's ``log_threshold``) and ``topk``;
- ``topk`` with ``rescale_acts_by_decoder_norm`` (the default of ``TopKTrainingSAE``): SAELens picks the top
  ``k`` of ``pre * ||W_dec[i]||`` and decodes ``f / ||W_dec[i]||``; the norms are folded into the weights at
  load, as SAELens' ``fold_W_dec_norm`` does, which gives a plain TopK SAE with the same features and
  reconstruction;
- the flat configuration of SAELens < 6 (``activation_fn_str``/``activation_fn_kwargs``, ``hook_point``,
  a boolean ``normalize_activations``, an all-ones ``scaling_factor``), converted as SAELens 6 converts it.

sparsify folders (``SparseCoder.save_to_disk``) load for ``activation="topk"``, autoencoders and transcoders
(``transcode=True``: no ``b_dec`` subtracted from the input). What the `SparseAutoencoder` cannot compute is
refused with an error naming the layout (SAELens ``batchtopk``/``matryoshka_batchtopk`` training checkpoints,
``gated``, ``abstopk``, transcoders, ``temporal``, ``matching_pursuit``, run-time input normalisation;
sparsify ``groupmax`` and ``skip_connection``).

A location is a local folder or a Hub repository id; ``subfolder`` picks one SAE inside it (Gemma
Scope: ``layer_12/width_16k/average_l0_82``; sparsify: the hookpoint, e.g. ``layers.6``). Only the
files of that SAE are downloaded.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_ext.atomic import atomic_folder
from hf_ext.sae_match.sae import SparseAutoencoder

FORMATS = ("gemma_scope", "saelens", "sparsify")

# format -> the files that identify it in a folder
_FORMAT_FILES = {
    "gemma_scope": ("params.npz",),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
}
_SAELENS_ACTIVATIONS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_SAELENS_BATCH_TOPK = (
    "picks its top k over the whole batch, so a token's features depend on the other tokens; SAELens' "
    "`save_inference_model` (what its training runner writes at the end) turns it into a JumpReLU SAE, which loads"
)
_SAELENS_TRANSCODER = "predicts another hook's output from its input, which a SparseAutoencoder does not model"
# SAELens architectures a per-token ReLU/JumpReLU/TopK SparseAutoencoder cannot compute, and why.
_SAELENS_UNSUPPORTED = {
    "batchtopk": _SAELENS_BATCH_TOPK,
    "matryoshka_batchtopk": _SAELENS_BATCH_TOPK,
    "gated": "gates each feature with a second encoder path (`b_gate`, `r_mag`, `b_mag`)",
    "abstopk": "keeps the k largest |pre-activations| with their sign, without a ReLU",
    "transcoder": _SAELENS_TRANSCODER,
    "skip_transcoder": _SAELENS_TRANSCODER,
    "jumprelu_transcoder": _SAELENS_TRANSCODER,
    "jumprelu_skip_transcoder": _SAELENS_TRANSCODER,
    "temporal": "attends over earlier tokens' features",
    "matching_pursuit": "selects features one after another by matching pursuit",
}
# sparsify activations other than TopK, and why they cannot be loaded.
_SPARSIFY_UNSUPPORTED = {"groupmax": "keeps the largest pre-activation in each of k groups of latents"}
# Tensors of a SAELens sae_weights.safetensors that the reader uses (`scaling_factor` only when all ones).
_SAELENS_TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "scaling_factor"}
_SPARSIFY_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def load_sae(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    format: str = "auto",
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load an SAE in Gemma Scope, SAELens or sparsify format from a folder or the Hub.

    Args:
        path_or_repo_id: a local folder, or a Hub repository id (e.g. ``"google/gemma-scope-2b-pt-res"``).
        subfolder: the SAE's folder inside it (e.g. ``"layer_12/width_16k/average_l0_82"``).
        format: ``"auto"`` (decide from the files present), ``"gemma_scope"``, ``"saelens"`` or ``"sparsify"``.
        cache_dir: the Hub cache to use (``huggingface_hub``'s default when None).
        revision: the Hub revision (branch, tag or commit).
        dtype: cast the weights to this dtype (they keep the stored dtype when None).

    Returns:
        A `SparseAutoencoder` whose ``metadata`` records the format, the location and, when the
        files say it, the hook name.

    Raises:
        ValueError: unknown ``format``, no SAE files at the location, a configuration this loader
            cannot reproduce (e.g. SAELens ``gated``), or inconsistent / non-finite weights.

    Examples:
        >>> from hf_ext.sae_match import load_sae
        >>> sae = load_sae("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")  # doctest: +SKIP
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"`format` must be 'auto' or one of {FORMATS}, got {format!r}.")
    folder = _resolve_folder(path_or_repo_id, subfolder, format, cache_dir, revision)
    if format == "auto":
        format = _detect_format(folder)
    elif not all((folder / name).is_file() for name in _FORMAT_FILES[format]):
        raise ValueError(f"`format`={format!r} needs {_FORMAT_FILES[format]} in {folder}; found {_listing(folder)}.")
    sae = _READERS[format](folder)
    sae.metadata.update(format=format, location=_describe(path_or_repo_id, subfolder))
    return sae if dtype is None else sae.to(dtype)


def _describe(path_or_repo_id, subfolder) -> str:
    return str(path_or_repo_id) if not subfolder else f"{path_or_repo_id}/{subfolder}"


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _resolve_folder(path_or_repo_id, subfolder, format, cache_dir, revision) -> Path:
    local = Path(path_or_repo_id)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise ValueError(f"`subfolder`={subfolder!r} does not exist in {local}.")
        return folder
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ValueError(f"`path_or_repo_id`={repo_id!r} is neither an existing folder nor a Hub repository id ('org/name').")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = sorted({name for files in _FORMAT_FILES.values() for name in files}) if format == "auto" else _FORMAT_FILES[format]
    snapshot = Path(
        snapshot_download(repo_id, allow_patterns=[prefix + name for name in names], cache_dir=cache_dir, revision=revision)
    )
    return snapshot / prefix if prefix else snapshot


def _detect_format(folder: Path) -> str:
    for format, names in _FORMAT_FILES.items():
        if all((folder / name).is_file() for name in names):
            return format
    raise ValueError(
        f"No SAE found in {folder}: expected one of "
        + "; ".join(f"{f}: {' + '.join(n)}" for f, n in _FORMAT_FILES.items())
        + f"; found {_listing(folder)}."
    )


def _read_gemma_scope(folder: Path) -> SparseAutoencoder:
    with np.load(folder / "params.npz") as params:
        # Some releases spell the keys in lower case (w_enc, w_dec).
        weights = {key.lower(): torch.from_numpy(params[key]) for key in params.files}
    missing = {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"} - set(weights)
    if missing:
        raise ValueError(f"{folder / 'params.npz'} lacks {sorted(missing)}; it has {sorted(weights)}.")
    return SparseAutoencoder(
        weights["w_enc"], weights["b_enc"], weights["w_dec"], weights["b_dec"],
        activation="jumprelu", threshold=weights["threshold"], apply_b_dec_to_input=False,
        metadata={"hook_name": None},
    )


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_saelens(folder: Path) -> SparseAutoencoder:
    cfg_path = folder / "cfg.json"
    cfg = _saelens_6_config(_read_json(cfg_path), cfg_path)
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_ACTIVATIONS:
        reason = _SAELENS_UNSUPPORTED.get(architecture)
        raise ValueError(
            f"SAELens architecture {architecture!r} in {cfg_path} is not supported{f': it {reason}' if reason else ''}; "
            f"supported: {sorted(_SAELENS_ACTIVATIONS)}."
        )
    normalize = cfg.get("normalize_activations", "none")
    if normalize != "none":
        raise ValueError(
            f"SAELens `normalize_activations`={normalize!r} in {cfg_path} is not supported: the weights expect "
            "rescaled inputs (at run time, or by a factor kept outside the weights, e.g. a training checkpoint's "
            "activation_scaler.json); fold the scaling into the weights and save with 'none', as SAELens' training "
            "runner does at the end."
        )
    weights = load_file(folder / "sae_weights.safetensors")
    unknown = sorted(set(weights) - _SAELENS_TENSORS)
    if unknown:
        raise ValueError(f"{folder / 'sae_weights.safetensors'} has tensors this loader does not use: {unknown}.")
    scaling_factor = weights.pop("scaling_factor", None)
    if scaling_factor is not None and not bool((scaling_factor == 1).all()):
        raise ValueError(
            f"{folder / 'sae_weights.safetensors'} has a `scaling_factor` other than 1 (SAELens < 6 fine-tuning "
            "scaling of the feature activations), which is not supported."
        )
    if "threshold" not in weights and "log_threshold" in weights:  # training checkpoints store log(theta)
        weights["threshold"] = weights.pop("log_threshold").exp()
    activation = _SAELENS_ACTIVATIONS[architecture]
    rescaled = activation == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescaled:
        _fold_decoder_norms(weights)
    meta = cfg.get("metadata") or cfg.get("meta") or {}  # nested since SAELens 6, flat before
    metadata = {"hook_name": meta.get("hook_name", cfg.get("hook_name"))}
    if rescaled:
        metadata["decoder_norms_folded"] = True
    sae = SparseAutoencoder(
        weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
        activation=activation,
        threshold=weights.get("threshold") if activation == "jumprelu" else None,
        k=int(cfg["k"]) if activation == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        metadata=metadata,
    )
    _check_declared_sizes(folder, sae, cfg.get("d_in"), cfg.get("d_sae"))
    return sae


def _saelens_6_config(cfg: dict, cfg_path: Path) -> dict:
    """A SAELens cfg.json as SAELens 6 reads it.

    SAELens < 6 wrote a flat configuration: the activation as ``activation_fn_str`` (TopK's ``k`` in
    ``activation_fn_kwargs``) under ``architecture="standard"``, the hook as ``hook_point``, and
    ``normalize_activations`` as a boolean (True meaning ``expected_average_only_in``). SAELens 6 converts these
    in ``handle_pre_6_0_config``; so does this function, refusing activations other than ReLU and TopK.
    """
    cfg = dict(cfg)
    if "hook_point" in cfg:
        cfg.setdefault("hook_name", cfg.pop("hook_point"))
    activation_fn = cfg.pop("activation_fn_str", cfg.pop("activation_fn", None))
    if activation_fn not in (None, "relu") and cfg.get("architecture", "standard") == "standard":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if activation_fn != "topk" or k is None:
            raise ValueError(
                f"SAELens activation {activation_fn!r} (kwargs {cfg.get('activation_fn_kwargs')}) in {cfg_path} is not "
                "supported; supported: 'relu', and 'topk' with `activation_fn_kwargs.k`."
            )
        cfg.update(architecture="topk", k=k)
    if isinstance(cfg.get("normalize_activations"), bool) or cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "expected_average_only_in" if cfg.get("normalize_activations") else "none"
    return cfg


def _fold_decoder_norms(weights: dict[str, torch.Tensor]) -> None:
    """Fold the decoder row norms ``n_i = ||W_dec[i]||`` of a SAELens TopK SAE saved with
    ``rescale_acts_by_decoder_norm`` into its weights, in place, as SAELens' ``fold_W_dec_norm`` does.

    Such an SAE encodes ``TopK(((x - b_dec) @ W_enc + b_enc) * n)`` and decodes ``(f / n) @ W_dec + b_dec``. With
    ``W_enc[:, i] *= n_i``, ``b_enc[i] *= n_i`` and ``W_dec[i] /= n_i`` a plain TopK SAE computes the same
    features ``f`` and the same reconstruction (up to rounding); its decoder rows have unit norm.
    """
    norms = weights["W_dec"].norm(dim=-1).clamp(min=1e-8)  # SAELens' get_W_dec_norm
    weights["W_dec"] = weights["W_dec"] / norms[:, None]
    weights["W_enc"] = weights["W_enc"] * norms[None, :]
    weights["b_enc"] = weights["b_enc"] * norms


def _read_sparsify(folder: Path) -> SparseAutoencoder:
    cfg_path = folder / "cfg.json"
    cfg = _read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        reason = _SPARSIFY_UNSUPPORTED.get(activation)
        raise ValueError(
            f"sparsify activation {activation!r} in {cfg_path} is not supported{f': it {reason}' if reason else ''}; "
            "supported: 'topk'."
        )
    if cfg.get("skip_connection"):
        raise ValueError(
            f"sparsify `skip_connection`=True in {cfg_path} is not supported: it adds a linear path `x @ W_skip.T` "
            "to the output, which a SparseAutoencoder does not have."
        )
    weights = load_file(folder / "sae.safetensors")
    if "W_dec" not in weights:
        raise ValueError(f"{folder / 'sae.safetensors'} has no decoder (`W_dec`); it was saved without one.")
    unknown = sorted(set(weights) - _SPARSIFY_TENSORS)
    if unknown:
        raise ValueError(f"{folder / 'sae.safetensors'} has tensors this loader does not use: {unknown}.")
    transcode = bool(cfg.get("transcode", False))
    sae = SparseAutoencoder(
        weights["encoder.weight"].T, weights["encoder.bias"], weights["W_dec"], weights["b_dec"],
        activation="topk", k=int(cfg["k"]),
        apply_b_dec_to_input=not transcode,  # an autoencoder subtracts b_dec from its input, a transcoder does not
        metadata={"hook_name": folder.name, "transcode": transcode},
    )
    _check_declared_sizes(folder, sae, cfg.get("d_in"), cfg.get("num_latents") or None)
    return sae


def _check_declared_sizes(folder: Path, sae: SparseAutoencoder, d_in, n_features) -> None:
    if d_in is not None and int(d_in) != sae.d_model:
        raise ValueError(f"{folder / 'cfg.json'} declares d_in={d_in} but the weights have d_model={sae.d_model}.")
    if n_features is not None and int(n_features) != sae.n_features:
        raise ValueError(f"{folder / 'cfg.json'} declares {n_features} features but the weights have {sae.n_features}.")


_READERS = {"gemma_scope": _read_gemma_scope, "saelens": _read_saelens, "sparsify": _read_sparsify}
_SAVED_FILES = ("params.npz", "sae_weights.safetensors", "sae.safetensors", "cfg.json")  # what save_sae writes, any format


def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike, format: str = "saelens") -> Path:
    """Write ``sae`` into ``folder`` in one of the formats `load_sae` reads.

    The files are written to a temporary folder beside ``folder`` that replaces it when complete
    (:func:`hf_ext.atomic.atomic_folder`), so ``folder`` holds the old SAE or the new one, never a mix.

    Args:
        sae: the SAE.
        folder: where to write: a new or empty folder, or one holding a previous save (replaced whole).
        format: ``"saelens"`` (any activation), ``"gemma_scope"`` (JumpReLU without ``b_dec`` subtraction)
            or ``"sparsify"`` (TopK).

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        ValueError: unknown ``format``, an SAE the format cannot express, or a ``folder`` holding other files.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    if format == "gemma_scope" and (sae.activation != "jumprelu" or sae.apply_b_dec_to_input):
        raise ValueError("format='gemma_scope' holds JumpReLU SAEs that do not subtract b_dec from the input.")
    if format == "sparsify" and sae.activation != "topk":
        raise ValueError(f"format='sparsify' holds TopK SAEs, got activation={sae.activation!r}.")
    if format == "sparsify" and not sae.apply_b_dec_to_input and not sae.metadata.get("transcode"):
        raise ValueError("format='sparsify' autoencoders subtract b_dec from the input; this SAE does not.")
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    with atomic_folder(folder, overwrite=_SAVED_FILES, arg="folder") as tmp:  # a previous save is replaced whole
        if format == "gemma_scope":
            np.savez(tmp / "params.npz", **{name: t.numpy() for name, t in tensors.items()})
        elif format == "saelens":
            save_file(tensors, tmp / "sae_weights.safetensors")
            _write_json(tmp / "cfg.json", _saelens_cfg(sae))
        else:
            save_file(
                {"encoder.weight": tensors["W_enc"].T.contiguous(), "encoder.bias": tensors["b_enc"],
                 "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]},
                tmp / "sae.safetensors",
            )
            _write_json(tmp / "cfg.json", {"activation": "topk", "num_latents": sae.n_features, "k": sae.k,
                                           "transcode": bool(sae.metadata.get("transcode", False)), "d_in": sae.d_model})
    return Path(folder).expanduser()


def _saelens_cfg(sae: SparseAutoencoder) -> dict:
    architecture = {v: k for k, v in _SAELENS_ACTIVATIONS.items()}[sae.activation]
    cfg = {
        "architecture": architecture, "d_in": sae.d_model, "d_sae": sae.n_features, "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "metadata": {"hook_name": sae.metadata.get("hook_name")},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
    return cfg


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


__all__ = ["FORMATS", "load_sae", "save_sae"]
