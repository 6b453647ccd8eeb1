"""Every private touch of a peer library (`hf_ext._compat`) still holds on the installed versions.

An upgrade of transformers, PEFT, TRL, accelerate or huggingface_hub that removes or reshapes a private name
hf_ext relies on fails here first, with a message naming the compat function to fix.
"""

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
