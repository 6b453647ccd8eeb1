"""Registration of hf_ext's classes with the libraries it extends.

Each entry of `_REGISTRATION_MODULES` names a module that defines ``register()``; importing
``hf_ext`` calls each once. ``register()`` must be idempotent: a second call, or a call after the
module was reloaded, leaves one registration in place, and a class the user registered under the
same name is left alone (with a warning).
"""

import importlib
import logging

logger = logging.getLogger(__name__)

# Each method whose classes need registering adds its module here.
_REGISTRATION_MODULES: list[str] = ["hf_ext.models.based", "hf_ext.models.palbert", "hf_ext.tuners.aot_ptuning", "hf_ext.models.ddlm"]

_done: set[str] = set()


def register_all() -> None:
    """Call ``register()`` of every registration module not registered yet in this process."""
    for module_name in _REGISTRATION_MODULES:
        if module_name in _done:
            continue
        importlib.import_module(module_name).register()
        _done.add(module_name)


def same_class(a: type, b: type) -> bool:
    """Whether ``a`` and ``b`` are one class, counting a class re-created by reloading its module as the same."""
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def register_auto_classes(config_cls: type, auto_to_model: dict) -> None:
    """Register ``config_cls`` with ``AutoConfig`` and each model class with its Auto class.

    Args:
        config_cls: a ``PreTrainedConfig`` subclass with a ``model_type``.
        auto_to_model: maps an Auto class (``AutoModel``, ``AutoModelForCausalLM``, ...) to the model
            class it should build for ``config_cls``.

    Registration goes through the public ``register(..., exist_ok=True)``: a second import, or a reload
    of the module (a new class object), re-points ``model_type`` at the current classes, and the Auto
    classes find the model by the class of the loaded config. A ``model_type`` the user registered to a
    class of their own stays theirs, with a warning.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_cls.model_type
    existing = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    if existing is not None and not same_class(existing, config_cls):
        logger.warning(
            "model_type %r is already registered to %s.%s; hf_ext leaves it as it is.",
            model_type,
            existing.__module__,
            existing.__qualname__,
        )
        return
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    for auto_cls, model_cls in auto_to_model.items():
        auto_cls.register(config_cls, model_cls, exist_ok=True)


__all__ = ["register_all", "register_auto_classes", "same_class"]
