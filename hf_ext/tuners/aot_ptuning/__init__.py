"""AoT P-Tuning ("Ahead-of-Time P-Tuning", Gavrilov & Balagansky, arXiv 2305.10835) as a PEFT method.

``import hf_ext`` calls `register()`, after which `peft.get_peft_model(model, AoTPTuningConfig(...))` and
`PeftModel.from_pretrained(model, folder)` work as for PEFT's own methods.
"""

import logging

from peft.utils import PeftType

from .config import AoTPTuningConfig
from .layer import AoTPTuningLayer
from .model import AoTPTuningModel

logger = logging.getLogger(__name__)

PEFT_TYPE_NAME = "AOT_PTUNING"


def _add_peft_type_member() -> PeftType:
    """Add ``AOT_PTUNING`` to PEFT's `PeftType` enum, which `register_peft_method` insists on (once per process)."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)  # EnumType.__setattr__ refuses to set members
    return member


def _same_class(a: type, b: type) -> bool:
    # A reloaded module gives a new class object with the same qualified name.
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def register() -> None:
    """Register AoT P-Tuning with PEFT; idempotent.

    A second call, or a call after this module was reloaded, re-points PEFT's tables at the current classes;
    a foreign method already registered under ``AOT_PTUNING`` is left alone, with a warning.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = _add_peft_type_member()
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is None:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=AoTPTuningConfig, model_cls=AoTPTuningModel, prefix=AoTPTuningModel.prefix
        )
    elif _same_class(existing, AoTPTuningConfig):
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = AoTPTuningConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = AoTPTuningModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = AoTPTuningModel.prefix
    else:
        logger.warning(
            "PEFT type %s is already registered to %s.%s; hf_ext leaves it as it is.",
            PEFT_TYPE_NAME,
            existing.__module__,
            existing.__qualname__,
        )


__all__ = ["AoTPTuningConfig", "AoTPTuningLayer", "AoTPTuningModel", "register"]
