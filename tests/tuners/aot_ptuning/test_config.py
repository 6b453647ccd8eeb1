"""AoTPTuningConfig: checks, docs, save/load, and the idempotent PEFT registration."""

import dataclasses
import importlib

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hf_ext  # noqa: F401  (registers the PEFT type)
from hf_ext import AoTPTuningConfig, AoTPTuningModel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reparametrization": "lora"}, r"`reparametrization` must be one of \('fc', 'kronecker', 'none'\), got 'lora'"),
        ({"fc_hidden_size": 0}, r"`fc_hidden_size` must be an integer >= 1, got 0"),
        ({"kronecker_rank": 2.5}, r"`kronecker_rank` must be an integer >= 1, got 2.5"),
        ({"vocab_size": -3}, r"`vocab_size` must be None or an integer >= 1, got -3"),
    ],
)
def test_bad_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AoTPTuningConfig(**kwargs)


def test_every_field_is_documented_with_help():
    own = [f for f in dataclasses.fields(AoTPTuningConfig) if f.name not in {f.name for f in dataclasses.fields(PeftConfig)}]
    assert {f.name for f in own} >= {"reparametrization", "fc_hidden_size", "kronecker_rank", "save_collapsed"}
    for f in own:
        assert f"{f.name} (`" in AoTPTuningConfig.__doc__, f.name
        assert f.metadata.get("help"), f.name


def test_save_load_round_trip(tmp_path):
    config = AoTPTuningConfig(reparametrization="kronecker", kronecker_rank=4, vocab_size=77, target_modules=["h.0"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, AoTPTuningConfig)
    assert loaded.peft_type == PeftType.AOT_PTUNING
    assert (loaded.reparametrization, loaded.kronecker_rank, loaded.vocab_size) == ("kronecker", 4, 77)
    assert loaded.target_modules == {"h.0"}


def test_collapsed_config_is_saved_as_raw_tables(tmp_path):
    AoTPTuningConfig(reparametrization="fc", save_collapsed=True, vocab_size=10).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert (loaded.reparametrization, loaded.save_collapsed) == ("none", False)


def test_registration_is_idempotent_and_survives_reload():
    import hf_ext.tuners.aot_ptuning as aot

    members_before = list(PeftType)
    aot.register()
    reloaded = importlib.reload(aot)
    reloaded.register()
    assert list(PeftType) == members_before
    assert [m for m in PeftType if m.value == "AOT_PTUNING"] == [PeftType.AOT_PTUNING]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.AOT_PTUNING].__qualname__ == AoTPTuningConfig.__qualname__
    assert PEFT_TYPE_TO_TUNER_MAPPING["AOT_PTUNING"].__qualname__ == AoTPTuningModel.__qualname__
