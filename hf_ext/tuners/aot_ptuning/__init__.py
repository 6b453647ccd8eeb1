"""AoT P-Tuning ("Ahead-of-Time P-Tuning", Gavrilov & Balagansky, arXiv 2305.10835) as a PEFT method.

``import hf_ext`` calls `register()`, after which `peft.get_peft_model(model, AoTPTuningConfig(...))` and
`PeftModel.from_pretrained(model, folder)` work as for PEFT's own methods.
"""

import logging

from hf_ext._compat.peft import add_peft_type_member
from hf_ext._registration import same_class

from .config import AoTPTuningConfig
from .layer import AoTPTuningLayer
from .model import AoTPTuningModel

logger = logging.getLogger(__name__)

PEFT_TYPE_NAME = "AOT_PTUNING"


def register() -> None:
    """Register AoT P-Tuning with PEFT; idempotent.

    A second call, or a call after this module was reloaded, re-points PEFT's tables at the current classes;
    a foreign method already registered under ``AOT_PTUNING`` is left alone, with a warning.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = add_peft_type_member(PEFT_TYPE_NAME)
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is None:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=AoTPTuningConfig, model_cls=AoTPTuningModel, prefix=AoTPTuningModel.prefix
        )
    elif same_class(existing, AoTPTuningConfig):
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
