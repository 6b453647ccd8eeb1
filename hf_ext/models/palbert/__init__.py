"""PALBERT (arXiv 2204.03276): ALBERT with a PonderNet exit head and per-example early exit.

`register()` (called once by ``import hf_ext``) maps model_type "palbert" to these classes in
``AutoConfig`` / ``AutoModel`` / ``AutoModelForSequenceClassification`` and marks them for remote code, so a
saved model also loads with ``trust_remote_code=True`` where hf_ext is not installed.
"""

from .configuration_palbert import PalbertConfig
from .modeling_palbert import PalbertForSequenceClassification, PalbertModel


def register() -> None:
    """Register PALBERT with the Auto classes and for remote-code saving (idempotent)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from hf_ext._registration import register_auto_classes

    register_auto_classes(
        PalbertConfig,
        {AutoModel: PalbertModel, AutoModelForSequenceClassification: PalbertForSequenceClassification},
    )
    PalbertConfig.register_for_auto_class()
    PalbertModel.register_for_auto_class("AutoModel")
    PalbertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


__all__ = ["PalbertConfig", "PalbertForSequenceClassification", "PalbertModel", "register"]
