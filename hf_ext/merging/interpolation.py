"""Linear interpolation in parameter space, in memory.

"Linear Interpolation In Parameter Space is Good Enough for Fine-Tuned Language Models"
(Rofin, Balagansky, Gavrilov; https://arxiv.org/abs/2211.12092) moves along the line through the
pre-trained weights theta_base and the fine-tuned weights theta_tuned,

    theta(alpha) = theta_base + alpha * (theta_tuned - theta_base),

tensor by tensor: alpha = 0 is the base model, alpha = 1 the tuned one, alpha in (0, 1) lies between
them and alpha outside [0, 1] extrapolates (a negative alpha moves against what fine-tuning taught).

The maths is :func:`lerp` on one tensor; :func:`interpolate_state_dict` applies it to matching
tensors; :func:`interpolate_models` does it for two models, or for a PEFT LoRA model by scaling
each adapter's B factor (theta_tuned - theta_base = dW = scaling * B @ A is linear in B).
"""

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

_MAX_LISTED = 5  # offenders quoted in an error message


def lerp(
    base: torch.Tensor,
    tuned: torch.Tensor,
    alpha: float,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + alpha * (tuned - base)`` for one tensor, computed in float32 and cast back.

    The result is on ``tuned``'s device, in ``dtype`` (default: ``tuned``'s dtype). ``torch.lerp``
    evaluates ``tuned - (tuned - base) * (1 - alpha)`` for ``alpha >= 0.5``, so ``alpha = 0``
    returns ``base`` and ``alpha = 1`` returns ``tuned`` bit for bit (for finite values).

    For bf16/fp16 inputs kept in their dtype, ATen's lerp already computes in float32 ("opmath")
    and rounds once, so it is called on them directly: the same bits as upcasting first (tested
    against that reference), without the float32 copies.

    Args:
        base: theta_base, a floating tensor.
        tuned: theta_tuned, same shape and dtype as ``base``.
        alpha: the interpolation coefficient (any finite number; outside [0, 1] extrapolates).
        dtype: the result's dtype, if not ``tuned``'s (cast once, from the float32 result).
        out: a tensor of the result's shape, dtype and device to write into, as ``torch.lerp``'s
            ``out``; when ``dtype`` is ``tuned``'s, no temporary is made (what streaming a large
            checkpoint into preallocated shards needs to keep its peak memory, see BENCHMARKS.md).

    Returns:
        theta(alpha): a new tensor, or ``out``.

    Examples:
        >>> lerp(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), 0.5)
        tensor([0.5000, 3.0000])
        >>> lerp(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0]), -1.0)
        tensor([-1.,  0.])
    """
    base = base.to(tuned.device)
    if dtype is None or dtype == tuned.dtype:
        return torch.lerp(base, tuned, float(alpha), out=out)
    compute_dtype = torch.promote_types(tuned.dtype, torch.float32)  # fp64 stays fp64
    theta = torch.lerp(base.to(compute_dtype), tuned.to(compute_dtype), float(alpha))
    return theta.to(dtype) if out is None else out.copy_(theta)


def check_alpha(alpha, name: str = "alpha") -> float:
    """Return ``alpha`` as a float; TypeError if it is not an int or float, ValueError if it is not finite."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"`{name}` must be an int or float, got {type(alpha).__name__} {alpha!r}.")
    if not math.isfinite(alpha):
        raise ValueError(f"`{name}` must be finite, got {alpha!r}.")
    return float(alpha)


def check_tensor_specs(
    base: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tuned: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    require_same_keys: bool = True,
) -> None:
    """Raise ValueError if two ``{name: (shape, dtype)}`` maps cannot be interpolated.

    Checks, in this order, that the keys match (``missing``: in base but not in tuned;
    ``unexpected``: in tuned but not in base; skipped with ``require_same_keys=False``), then that
    the shared tensors agree in shape and in dtype. Each message lists the first offenders.
    """
    if require_same_keys:
        missing = [k for k in base if k not in tuned]
        unexpected = [k for k in tuned if k not in base]
        if missing or unexpected:
            raise ValueError(
                "`base` and `tuned` do not have the same tensors: "
                f"{len(missing)} missing from tuned {missing[:_MAX_LISTED]}, "
                f"{len(unexpected)} unexpected in tuned {unexpected[:_MAX_LISTED]}."
            )
    shared = [k for k in base if k in tuned]
    shapes = [f"{k}: {tuple(base[k][0])} vs {tuple(tuned[k][0])}" for k in shared if tuple(base[k][0]) != tuple(tuned[k][0])]
    if shapes:
        raise ValueError(f"{len(shapes)} tensor(s) differ in shape (base vs tuned): {shapes[:_MAX_LISTED]}.")
    dtypes = [f"{k}: {base[k][1]} vs {tuned[k][1]}" for k in shared if base[k][1] != tuned[k][1]]
    if dtypes:
        raise ValueError(f"{len(dtypes)} tensor(s) differ in dtype (base vs tuned): {dtypes[:_MAX_LISTED]}.")


def _specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def interpolate_state_dict(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Interpolate two state dicts with the same keys, shapes and dtypes.

    Floating tensors become :func:`lerp` ``(base, tuned, alpha)``; other tensors (integer ids,
    boolean masks) are taken from ``tuned``.

    Raises:
        ValueError: the keys, shapes or dtypes differ (the message lists the first offenders).
    """
    alpha = check_alpha(alpha)
    check_tensor_specs(_specs(base), _specs(tuned))
    return {k: lerp(base[k], t, alpha) if t.is_floating_point() else t.clone() for k, t in tuned.items()}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    base_type = getattr(getattr(base, "config", None), "model_type", None)
    tuned_type = getattr(getattr(tuned, "config", None), "model_type", None)
    if base_type != tuned_type:
        raise ValueError(f"`base` and `tuned` are different architectures: model_type {base_type!r} vs {tuned_type!r}.")


def _interpolate_dense(base: nn.Module, tuned: nn.Module, alpha: float, inplace: bool) -> nn.Module:
    _check_same_architecture(base, tuned)
    # remove_duplicate=False on base so that a tied name (lm_head.weight) finds its tensor too.
    base_params = dict(base.named_parameters(remove_duplicate=False))
    shared = {name: p for name, p in tuned.named_parameters() if name in base_params and p.is_floating_point()}
    if not shared:
        raise ValueError("`base` and `tuned` share no floating parameter names; nothing to interpolate.")
    check_tensor_specs(
        {n: (tuple(base_params[n].shape), base_params[n].dtype) for n in shared}, _specs(shared), require_same_keys=False
    )
    out = tuned if inplace else copy.deepcopy(tuned)
    out_params = dict(out.named_parameters())
    with torch.no_grad():
        for name in shared:
            target = out_params[name]
            target.copy_(lerp(base_params[name], target, alpha))
    return out


def _peft_base_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights W0 inside a PEFT model, under the plain model's parameter names."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner = peft_model.get_base_model()
    adapter_prefixes = set()
    for name, module in inner.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            for attr in module.adapter_layer_names + getattr(module, "other_param_names", ()):
                adapter_prefixes.add(f"{name}.{attr}.")
    weights = {}
    for name, param in inner.named_parameters(remove_duplicate=False):
        if any(name.startswith(p) for p in adapter_prefixes):
            continue
        weights[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = param
    return weights


def _lora_factors(module: nn.Module, adapter: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters of ``adapter``'s A and B factors in a LoRA layer (B's bias included, if any)."""
    if adapter in module.lora_B:
        return list(module.lora_A[adapter].parameters()), list(module.lora_B[adapter].parameters())
    return [module.lora_embedding_A[adapter]], [module.lora_embedding_B[adapter]]  # LoRA on an nn.Embedding


def _interpolate_peft(base: nn.Module, tuned: nn.Module, alpha: float, inplace: bool) -> nn.Module:
    """theta(alpha) = W0 + alpha * sum_i dW_i for the active LoRA adapters i, by scaling each B factor by alpha.

    A LoRA layer computes ``base_layer(x) + lora_B(lora_A(x)) * scaling[adapter]`` for each active
    adapter, so multiplying ``lora_B``'s weight (and bias, if any) by alpha scales its dW exactly,
    and several active adapters are scaled each on its own dW (never by mixing A and B factors). The
    result is an ordinary adapter, so ``save_pretrained`` writes what the model computes. Factors tied
    between layers (``ensure_weight_tying``: the output layer's B is the embedding's A) are scaled once.
    A module fully trained beside the adapter (``modules_to_save``) is interpolated densely between its
    original and trained copies.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if base is not tuned.get_base_model():
        expected = _peft_base_weights(tuned)
        actual = dict(base.named_parameters(remove_duplicate=False))
        differing = [k for k in expected if k not in actual or not torch.equal(actual[k].to(expected[k].device), expected[k])]
        if differing or set(actual) - set(expected):
            raise ValueError(
                "`base` is not the model the PEFT adapter in `tuned` sits on: "
                f"{len(differing)} base weight(s) differ or are missing, e.g. {differing[:_MAX_LISTED]}."
            )
    try:
        out = tuned if inplace else copy.deepcopy(tuned)
    except RuntimeError as err:  # e.g. factors tied by ensure_weight_tying are views, which deepcopy refuses
        raise RuntimeError(f"`tuned` cannot be copied ({err}); pass inplace=True to interpolate it in place.") from err
    scaled = set()  # data pointers of factors already multiplied by alpha: a layer tied to one is scaled through it
    lora_layers = 0
    with torch.no_grad():
        for name, module in out.named_modules():
            if isinstance(module, LoraLayer):
                variants = [a for a in module.active_adapters if a in module.lora_variant]
                if variants:
                    raise ValueError(
                        f"LoRA variant adapters {variants} at {name!r} (e.g. DoRA) are not linear in their scaling; "
                        "merge them first (`merge_and_unload()`) and interpolate the dense models."
                    )
                for adapter in [a for a in module.active_adapters if a in module.scaling]:
                    factor_a, factor_b = _lora_factors(module, adapter)
                    lora_layers += 1
                    if any(p.data_ptr() in scaled for p in factor_a + factor_b):
                        continue
                    for param in factor_b:
                        param.mul_(alpha)
                        scaled.add(param.data_ptr())
            elif isinstance(module, ModulesToSaveWrapper):
                for adapter in module.active_adapters:
                    if adapter in module.modules_to_save:
                        trained = module.modules_to_save[adapter]
                        pairs = zip(module.original_module.named_parameters(), trained.named_parameters(), strict=True)
                        for (_, p0), (_, p1) in pairs:
                            if p1.is_floating_point():
                                p1.copy_(lerp(p0, p1, alpha))
            elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                raise TypeError(f"Only LoRA adapters can be interpolated; {name!r} is a {type(module).__name__}.")
    if lora_layers == 0:
        raise ValueError("`tuned` is a PEFT model without active LoRA layers; nothing to interpolate.")
    return out


def interpolate_models(base: nn.Module, tuned: nn.Module, alpha: float, *, inplace: bool = False) -> nn.Module:
    """Return a model with theta = theta_base + alpha * (theta_tuned - theta_base).

    Paper: https://arxiv.org/abs/2211.12092 (Rofin, Balagansky, Gavrilov, 2022).

    Two plain models (e.g. two ``PreTrainedModel`` s):
        every floating parameter present in both is :func:`lerp`-ed in float32 and cast back to its
        dtype; buffers and integer tensors come from ``tuned``. **Modules present in only one model**:
        the output has ``tuned``'s architecture, so a parameter only ``tuned`` has (a new head) is
        kept as trained (it has no pre-trained value to move from), and one only ``base`` has (a
        dropped head) is left out. Tied parameters are interpolated once.

    A PEFT model with LoRA adapters as ``tuned``, on ``base``:
        each active adapter's B factor (``lora_B``, with its bias) is multiplied by ``alpha``, so the
        model computes W0 + alpha * dW, and with several active adapters
        W0 + alpha * (dW_1 + dW_2 + ...), each dW = scaling * B @ A left whole (no mixing of A and B
        factors, which adds cross terms). ``modules_to_save`` are interpolated densely. The result is
        an ordinary LoRA model: ``save_pretrained`` writes an adapter that reloads to the same outputs
        (``PeftModel.from_pretrained``), and ``merge_and_unload()`` gives the dense model. LoRA
        variants that are not linear in their scaling (DoRA) raise ValueError.

    Args:
        base: the pre-trained model (theta at alpha = 0).
        tuned: the fine-tuned model, or a ``peft.PeftModel`` with LoRA adapters on ``base``
            (theta at alpha = 1).
        alpha: the coefficient; outside [0, 1] extrapolates.
        inplace: write the result into ``tuned`` instead of a deep copy of it.

    Returns:
        The interpolated model (``tuned`` itself when ``inplace=True``).

    Raises:
        TypeError: ``alpha`` is not a number, or a PEFT adapter is not LoRA.
        ValueError: ``alpha`` is not finite, different ``model_type``, shared parameters that differ in shape or dtype, or a
            PEFT adapter that does not sit on ``base``.

    Examples:
        >>> from hf_ext.testing import tiny_gpt2
        >>> base, tuned = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
        >>> mid = interpolate_models(base, tuned, 0.5)
        >>> w0, w1 = base.transformer.wte.weight, tuned.transformer.wte.weight
        >>> torch.allclose(mid.transformer.wte.weight, w0 + 0.5 * (w1 - w0))
        True
        >>> torch.equal(interpolate_models(base, tuned, 1.0).transformer.wte.weight, w1)
        True
    """
    alpha = check_alpha(alpha)
    for arg, value in (("base", base), ("tuned", tuned)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"`{arg}` must be a torch.nn.Module, got {type(value).__name__}.")
    if _is_peft_model(base):
        raise TypeError("`base` must be the plain pre-trained model; pass the PEFT model as `tuned`.")
    if _is_peft_model(tuned):
        return _interpolate_peft(base, tuned, alpha, inplace)
    return _interpolate_dense(base, tuned, alpha, inplace)


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


__all__ = ["check_alpha", "check_tensor_specs", "interpolate_models", "interpolate_state_dict", "lerp"]
