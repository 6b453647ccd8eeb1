"""Every private touch of a peer library (`hf_ext._compat`) still holds on the installed versions.

An upgrade of transformers, PEFT, TRL, accelerate or huggingface_hub that removes or reshapes a private name
hf_ext relies on fails here first, with a message naming the compat function to fix.
"""

import importlib

import pytest

from hf_ext._compat import PrivateAPIChanged, check_private_touches, load_all_touches, require_attr

TOUCHES = load_all_touches()


@pytest.mark.parametrize("function", sorted(TOUCHES))
def test_private_touch_holds_on_installed_version(function):
    touch = TOUCHES[function]
    touch.probe()  # raises PrivateAPIChanged naming the function when a name is gone


@pytest.mark.parametrize("function", sorted(TOUCHES))
def test_private_touch_is_documented(function):
    touch = TOUCHES[function]
    assert touch.names and all("._" in name for name in touch.names), touch.names
    assert touch.checked_on and touch.public_alternative
    module, name = function.rsplit(".", 1)
    doc = getattr(importlib.import_module(module), name).__doc__
    assert doc.endswith(f"\n\nChecked on {touch.library} {touch.checked_on} (touches {', '.join(touch.names)}). "
                        f"Public alternative: {touch.public_alternative}")


def test_check_private_touches_is_clean():
    assert check_private_touches() == []


def test_require_attr_names_the_function_when_a_name_is_gone():
    class Owner:
        _kept = 1

    assert require_attr(Owner, "_kept", "hf_ext._compat.example") == 1
    with pytest.raises(PrivateAPIChanged, match=r"hf_ext\._compat\.example: .*Owner\._gone no longer exists"):
        require_attr(Owner, "_gone", "hf_ext._compat.example")


def test_a_vanished_private_name_fails_the_check_naming_the_function(monkeypatch):
    # As an upgrade of transformers that dropped the property would: the check and the call both name the touch.
    from transformers import PreTrainedConfig

    from hf_ext._compat.transformers import attention_implementation

    config = PreTrainedConfig(attn_implementation="sdpa")
    monkeypatch.delattr(PreTrainedConfig, "_attn_implementation")
    failures = check_private_touches()
    assert len(failures) == 1
    assert failures[0].startswith("hf_ext._compat.transformers.attention_implementation (PreTrainedConfig._attn_implementation): ")
    with pytest.raises(PrivateAPIChanged, match=r"^hf_ext\._compat\.transformers\.attention_implementation: .*transformers 5\.25\.0"):
        attention_implementation(config)


def _drop_attention_property(monkeypatch):
    from transformers import PreTrainedConfig

    monkeypatch.delattr(PreTrainedConfig, "_attn_implementation")


def _drop_compute_loss(monkeypatch):
    from trl import DPOTrainer

    monkeypatch.delattr(DPOTrainer, "_compute_loss")


def _rewrite_reference_selection(monkeypatch):
    from trl import DPOTrainer

    def compute_ref_log_probs(self, inputs):  # a later TRL picking the reference adapter some other way
        return None

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", compute_ref_log_probs)


def _peft_type_without_enum(monkeypatch):
    import peft.utils

    class PeftType:  # a later PEFT with plain string constants
        LORA = "LORA"

    monkeypatch.setattr(peft.utils, "PeftType", PeftType)


# How each touch's private names could disappear or change in a later release, and what the check must then say.
VANISHINGS = {
    "hf_ext._compat.transformers.attention_implementation": [_drop_attention_property],
    "hf_ext._compat.trl.reference_adapter_name": [_drop_compute_loss, _rewrite_reference_selection],
    "hf_ext._compat.peft.add_peft_type_member": [_peft_type_without_enum],
}


def test_every_touch_has_a_vanishing_below():
    assert set(VANISHINGS) == set(TOUCHES)


@pytest.mark.parametrize(
    ("function", "vanish"), [(f, v) for f, vs in sorted(VANISHINGS.items()) for v in vs], ids=lambda x: getattr(x, "__name__", x)
)
def test_each_probe_fails_naming_its_function_when_its_private_names_change(function, vanish, monkeypatch):
    vanish(monkeypatch)
    failures = check_private_touches()
    assert len(failures) == 1, failures
    assert failures[0].startswith(f"{function} (")
    assert f"{function}: " in failures[0]  # the probe's own message names the function too
