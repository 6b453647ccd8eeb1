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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    before = dict(CONFIG_MAPPING._extra_content)
    register_all()
    importlib.reload(hf_ext)
    register_all()
    after = dict(CONFIG_MAPPING._extra_content)
    assert after.keys() == before.keys()


class _DummyConfig(PreTrainedConfig):
    model_type = "hf_ext_dummy_for_tests"


class _DummyModel(PreTrainedModel):
    config_class = _DummyConfig


def _mapped_models(auto_cls, model_type):
    return [m for c, m in auto_cls._model_mapping._extra_content.items() if c.model_type == model_type]


def test_register_auto_classes_twice_keeps_one_mapping():
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    assert AutoConfig.for_model("hf_ext_dummy_for_tests").__class__ is _DummyConfig
    assert _mapped_models(AutoModel, "hf_ext_dummy_for_tests") == [_DummyModel]


def test_register_auto_classes_repoints_a_reloaded_class():
    # A reloaded module defines a new class object with the same qualified name.
    Reloaded = type(_DummyModel.__name__, (PreTrainedModel,), {"config_class": _DummyConfig, "__module__": __name__})
    Reloaded.__qualname__ = _DummyModel.__qualname__
    register_auto_classes(_DummyConfig, {AutoModel: _DummyModel})
    register_auto_classes(_DummyConfig, {AutoModel: Reloaded})
    assert _mapped_models(AutoModel, "hf_ext_dummy_for_tests") == [Reloaded]


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
