"""`import hf_ext`: lazy public names and idempotent registration."""

import importlib
import json
import logging
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

import hf_ext
from hf_ext._registration import register_all, register_auto_classes

_HEAVY = ["trl", "diffusers", "matplotlib", "hf_ext.demo", "hf_ext.merging", "hf_ext.sae_match", "hf_ext.generation"]


def test_import_is_lazy():
    # scipy is not listed: transformers imports it itself (its object-detection losses).
    code = f"import sys, json, hf_ext; print(json.dumps([m for m in {_HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_every_public_name_resolves():
    for name in hf_ext.__all__:
        assert getattr(hf_ext, name) is not None, name
    assert set(hf_ext.__all__) <= set(dir(hf_ext))


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NotAThing'"):
        hf_ext.NotAThing  # noqa: B018


def test_register_all_is_idempotent_across_reloads():
    from transformers import AutoModelForCausalLM

    register_all()
    importlib.reload(hf_ext)
    register_all()
    config = AutoConfig.for_model("based", vocab_size=32, hidden_size=16, num_hidden_layers=1)
    assert type(config) is hf_ext.BasedConfig
    assert type(AutoModelForCausalLM.from_config(config)) is hf_ext.BasedForCausalLM


class _DummyConfig(PreTrainedConfig):
    model_type = "hf_ext_dummy_for_tests"


class _DummyModel(PreTrainedModel):
    config_class = _DummyConfig


def test_register_auto_classes_twice_keeps_one_mapping():
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    assert AutoConfig.for_model("hf_ext_dummy_for_tests").__class__ is _DummyConfig
    assert type(AutoModel.from_config(_DummyConfig())) is _DummyModel


def test_register_auto_classes_repoints_a_reloaded_class():
    # A reloaded module defines new class objects with the same qualified names.
    ReloadedConfig = type(_DummyConfig.__name__, (PreTrainedConfig,), {"model_type": _DummyConfig.model_type, "__module__": __name__})
    ReloadedConfig.__qualname__ = _DummyConfig.__qualname__
    Reloaded = type(_DummyModel.__name__, (PreTrainedModel,), {"config_class": ReloadedConfig, "__module__": __name__})
    Reloaded.__qualname__ = _DummyModel.__qualname__
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    register_auto_classes(ReloadedConfig, {AutoModel: Reloaded})
    assert AutoConfig.for_model("hf_ext_dummy_for_tests").__class__ is ReloadedConfig
    assert type(AutoModel.from_config(ReloadedConfig())) is Reloaded


def test_register_auto_classes_leaves_a_users_class_alone(caplog):
    class UserConfig(PreTrainedConfig):
        model_type = "hf_ext_user_owned_type"

    class OurConfig(PreTrainedConfig):
        model_type = "hf_ext_user_owned_type"

    AutoConfig.register("hf_ext_user_owned_type", UserConfig)
    with caplog.at_level(logging.WARNING, logger="hf_ext._registration"):
        register_auto_classes(OurConfig, {AutoModel: _DummyModel})
    assert AutoConfig.for_model("hf_ext_user_owned_type").__class__ is UserConfig
    assert "already registered" in caplog.text
