"""Touches of TRL's private names (see :mod:`hf_ext._compat`)."""

import inspect

from hf_ext._compat import PrivateAPIChanged, private_touch, require_attr

# What `DPOTrainer._compute_loss` (and `compute_ref_log_probs`) do with a PEFT policy and no `ref_model`: the
# reference log-probs come from the adapter named "ref" when the model has one, else from the base model.
_REFERENCE_ADAPTER_SOURCE = 'adapter_name="ref" if "ref" in'


def _probe_reference_adapter_name() -> None:
    from trl import DPOTrainer

    for method in ("_compute_loss", "compute_ref_log_probs"):
        source = inspect.getsource(require_attr(DPOTrainer, method, "hf_ext._compat.trl.reference_adapter_name"))
        if _REFERENCE_ADAPTER_SOURCE not in source:
            raise PrivateAPIChanged(
                f"hf_ext._compat.trl.reference_adapter_name: DPOTrainer.{method} no longer selects the reference "
                f"adapter with `{_REFERENCE_ADAPTER_SOURCE} ...`; TR-DPO's LoRA reference would be ignored."
            )


@private_touch(
    "trl",
    checked_on="1.16.0",
    names=("DPOTrainer._compute_loss",),
    public_alternative=(
        "none: TRL documents no way to name the reference adapter of a PEFT policy; its loss hard-codes the adapter "
        "name 'ref' (falling back to the base model without one)."
    ),
    probe=_probe_reference_adapter_name,
)
def reference_adapter_name() -> str:
    """The adapter name under which `DPOTrainer`'s loss looks for the reference of a PEFT policy: ``"ref"``.

    `DPOTrainer._compute_loss` and `compute_ref_log_probs` run the reference forward inside
    ``use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)``. TR-DPO's moving reference of
    a LoRA policy must be that adapter, or TRL would silently use the base model instead.
    """
    from trl import DPOTrainer

    require_attr(DPOTrainer, "_compute_loss", "hf_ext._compat.trl.reference_adapter_name")
    return "ref"


__all__ = ["reference_adapter_name"]
