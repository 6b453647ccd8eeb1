"""Based / ReBased (model_type "based"): configuration, models, and their Auto-class registration.

The modeling files import only torch and transformers (remote-code friendly); this package module may import
hf_ext, and :func:`register` maps `"based"` to the classes for `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM` (called once by ``import hf_ext``; idempotent).
"""

from .configuration_based import BasedConfig
from .modeling_based import BasedForCausalLM, BasedModel, BasedPreTrainedModel


def register() -> None:
    """Register the Based classes with the transformers Auto classes and for `save_pretrained` as remote code."""
    from transformers import AutoModel, AutoModelForCausalLM

    from hf_ext._registration import register_auto_classes

    register_auto_classes(BasedConfig, {AutoModel: BasedModel, AutoModelForCausalLM: BasedForCausalLM})
    # Saved models carry their code (config.json `auto_map`), so they load with trust_remote_code=True without hf_ext.
    BasedConfig.register_for_auto_class()
    BasedModel.register_for_auto_class("AutoModel")
    BasedForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["BasedConfig", "BasedForCausalLM", "BasedModel", "BasedPreTrainedModel", "register"]
