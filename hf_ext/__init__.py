"""hf_ext: eight research methods as Hugging Face-native pieces.

Public names are resolved lazily (PEP 562), so ``import hf_ext`` costs little more than importing
transformers; importing it registers the Auto classes and the PEFT method type (see
:mod:`hf_ext._registration`).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# module -> public names it defines; each method adds its own line.
_LAZY_IMPORTS: dict[str, list[str]] = {
    "hf_ext.model_card": ["render_model_card", "save_model_card"],
    "hf_ext.models.based": ["BasedConfig", "BasedForCausalLM", "BasedModel"],
    "hf_ext.merging": ["interpolate_checkpoints", "interpolate_models"],
    "hf_ext.models.palbert": ["PalbertConfig", "PalbertForSequenceClassification", "PalbertModel"],
    "hf_ext.trainers.trdpo": ["TRDPOConfig", "TRDPOTrainer"],
    "hf_ext.tuners.aot_ptuning": ["AoTPTuningConfig", "AoTPTuningModel"],
    "hf_ext.generation.caif": ["CAIFLogitsProcessor"],
    "hf_ext.models.ddlm": ["DDLMConfig", "DDLMModel"],
    "hf_ext.pipelines": ["DDLMPipeline", "DDLMScheduler"],
}

_NAME_TO_MODULE = {name: module for module, names in _LAZY_IMPORTS.items() for name in names}

__all__ = sorted(_NAME_TO_MODULE) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


from hf_ext._registration import register_all  # noqa: E402

register_all()
