"""AoTPTuningConfig: checks, docs, save/load, the idempotent PEFT registration and its `PeftType` member."""

import dataclasses
import enum
import glob
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hf_ext  # noqa: F401  (registers the PEFT type)
from hf_ext import AoTPTuningConfig, AoTPTuningModel
from hf_ext._compat import PrivateAPIChanged
from hf_ext._compat import peft as compat_peft
from hf_ext._compat.peft import _add_str_enum_member

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reparametrization": "lora"}, r"`reparametrization` must be one of \('fc', 'kronecker', 'none'\), got 'lora'"),
        ({"fc_hidden_size": 0}, r"`fc_hidden_size` must be an integer >= 1, got 0"),
        ({"kronecker_rank": 2.5}, r"`kronecker_rank` must be an integer >= 1, got 2.5"),
        ({"vocab_size": -3}, r"`vocab_size` must be None or an integer >= 1, got -3"),
        ({"init_weights": "gaussian"}, r"`init_weights` must be True or False, got 'gaussian'"),
    ],
)
def test_bad_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AoTPTuningConfig(**kwargs)


def test_every_field_is_documented_with_help():
    own = [f for f in dataclasses.fields(AoTPTuningConfig) if f.name not in {f.name for f in dataclasses.fields(PeftConfig)}]
    assert {f.name for f in own} >= {"reparametrization", "fc_hidden_size", "kronecker_rank", "init_weights", "save_collapsed"}
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


def test_peft_type_member_behaves_as_a_member(tmp_path):
    member = PeftType.AOT_PTUNING
    assert PeftType("AOT_PTUNING") is member and PeftType["AOT_PTUNING"] is member and member in list(PeftType)
    assert (member.name, member.value, str(member), member == "AOT_PTUNING") == (
        "AOT_PTUNING", "AOT_PTUNING", "PeftType.AOT_PTUNING", True
    )
    assert json.loads(json.dumps({"peft_type": member})) == {"peft_type": "AOT_PTUNING"}  # as adapter_config.json


def test_adding_an_enum_member_names_the_function_when_the_layout_changed(monkeypatch):
    scratch = enum.Enum("Scratch", {"A": "A"}, type=str)
    # a member that does not behave as one (here: an `_add_member_` that binds nothing) is undone, then reported
    type.__setattr__(scratch, "_add_member_", classmethod(lambda cls, name, member: None))
    with pytest.raises(PrivateAPIChanged, match=r"hf_ext\._compat\.example: adding 'B' to Scratch did not give a "
                                                r"working member on Python 3\.\d+\.\d+ \(checked on 3\.10-3\.13\)"):
        _add_str_enum_member(scratch, "B", "hf_ext._compat.example")
    assert list(scratch.__members__) == ["A"] and scratch._member_names_ == ["A"] and "B" not in vars(scratch)
    # an internal that is gone (as if a Python release renamed it)
    monkeypatch.setattr(compat_peft, "_ENUM_INTERNALS", ("_member_names_", "_member_map_", "_members_by_value_"))
    with pytest.raises(PrivateAPIChanged, match=r"hf_ext\._compat\.example: .*Scratch\._members_by_value_ no longer exists"):
        _add_str_enum_member(scratch, "B", "hf_ext._compat.example")


def _python(version: str) -> str | None:
    """An interpreter of that Python version: this one, a pyenv install, or one on PATH (pyenv's shims excluded)."""
    if version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return sys.executable
    installed = sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python{version}")))
    on_path = shutil.which(f"python{version}")
    return installed[-1] if installed else on_path if on_path and "shims" not in on_path else None


# PEFT's `peft/utils/peft_types.py` is plain Python (enum and typing only), so its `PeftType` loads alone on another
# Python, without torch (torch 2.13.0 has a CPU wheel here only for 3.11). `hf_ext` is entered without its
# `__init__` (which imports transformers), to run `hf_ext._compat.peft` against that `PeftType`.
_OTHER_PYTHON_SCRIPT = """
import importlib.util, json, pickle, sys, types
peft_types_path, root = sys.argv[1], sys.argv[2]
for name in ("peft", "peft.utils", "hf_ext"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [root + "/hf_ext"] if name == "hf_ext" else []
spec = importlib.util.spec_from_file_location("peft.utils.peft_types", peft_types_path)
peft_types = sys.modules["peft.utils.peft_types"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peft_types)
PeftType = sys.modules["peft.utils"].PeftType = peft_types.PeftType
from hf_ext._compat.peft import _probe_peft_type, add_peft_type_member
before = list(PeftType)
_probe_peft_type()
assert list(PeftType) == before, "the probe changed PeftType"
member = add_peft_type_member("AOT_PTUNING")
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "again": add_peft_type_member("AOT_PTUNING") is member,
    "by_value": PeftType("AOT_PTUNING") is member,
    "by_name": PeftType["AOT_PTUNING"] is member,
    "attribute": PeftType.AOT_PTUNING is member,
    "listed_last": list(PeftType) == before + [member],
    "in_members": "AOT_PTUNING" in PeftType.__members__,
    "is_str": member == "AOT_PTUNING" and isinstance(member, str),
    "pickles": pickle.loads(pickle.dumps(member)) is member,
    "repr": repr(member),
}))
"""


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_peft_type_member_on_each_python(version):
    python = _python(version)
    if python is None:
        pytest.skip(f"no python{version} on PATH or under ~/.pyenv/versions")
    peft_types_path = importlib.import_module("peft.utils.peft_types").__file__
    proc = subprocess.run(
        [python, "-c", _OTHER_PYTHON_SCRIPT, peft_types_path, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result.pop("python") == version
    assert result.pop("repr") == "<PeftType.AOT_PTUNING: 'AOT_PTUNING'>"
    assert result == dict.fromkeys(result, True), result
