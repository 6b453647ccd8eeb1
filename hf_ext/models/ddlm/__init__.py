"""DDLM (arXiv:2305.10818) on CDCD (arXiv:2211.15089): config and model, in transformers' layout."""

from .configuration_ddlm import DDLMConfig
from .modeling_ddlm import DDLMModel, DDLMModelOutput, DDLMPreTrainedModel


def register() -> None:
    """Register `DDLMConfig`/`DDLMModel` with AutoConfig/AutoModel, and mark both to be saved as remote code.

    Idempotent (see :func:`hf_ext._registration.register_auto_classes`). Saving then writes
    ``configuration_ddlm.py``/``modeling_ddlm.py`` and an ``auto_map`` beside the weights, so the folder
    loads with ``trust_remote_code=True`` where hf_ext is not installed.
    """
    from transformers import AutoModel

    from hf_ext._registration import register_auto_classes

    register_auto_classes(DDLMConfig, {AutoModel: DDLMModel})
    DDLMConfig.register_for_auto_class()
    DDLMModel.register_for_auto_class("AutoModel")


__all__ = ["DDLMConfig", "DDLMModel", "DDLMModelOutput", "DDLMPreTrainedModel", "register"]
