"""Touches of PEFT's private names (see :mod:`hf_ext._compat`)."""

import enum
import sys

from hf_ext._compat import PrivateAPIChanged, private_touch, require_attr

# The enum internals `add_peft_type_member` writes. Their layout is Python's, not PEFT's: checked on CPython
# 3.10, 3.11, 3.12 and 3.13 (3.13 adds `EnumType._add_member_`, which sets the class attribute and `_member_map_`).
_ENUM_INTERNALS = ("_member_names_", "_member_map_", "_value2member_map_")


def _probe_peft_type() -> None:
    """`PeftType` is still a str enum with the internals `add_peft_type_member` writes, and a member added the
    same way to a scratch copy of it behaves as a member (no change to `PeftType` itself)."""
    from peft.utils import PeftType

    function = f"{__name__}.add_peft_type_member"
    for name in _ENUM_INTERNALS:
        require_attr(PeftType, name, function)
    scratch = enum.Enum("PeftTypeProbe", {member.name: member.value for member in PeftType}, type=str)
    _add_str_enum_member(scratch, "HF_EXT_PROBE", function)


@private_touch(
    "peft",
    "0.21.2",
    names=tuple(f"PeftType.{name}" for name in _ENUM_INTERNALS),
    public_alternative=(
        "none: `peft.utils.register_peft_method` accepts only names already in `PeftType`, and Python's enum has no "
        "public way to add a member (3.13's `Enum._add_alias_` only names an existing one). Writing the three "
        "`PEFT_TYPE_TO_*_MAPPING` tables under a plain string key would avoid the enum, but PEFT then reads "
        "`config.peft_type.value` (model cards) and fails on a str."
    ),
    probe=_probe_peft_type,
)
def add_peft_type_member(name: str) -> enum.Enum:
    """Add ``name`` (value ``name``) to PEFT's `PeftType` enum once per process, and return the member.

    `register_peft_method` refuses a method whose name is not a `PeftType` member, and PEFT's tables, configs and
    model cards use the member (``config.peft_type.value``), so a method defined outside PEFT needs one. Calling it
    again returns the member already there.

    Raises:
        PrivateAPIChanged: the running Python lays its enums out differently (the member would not behave as one).
    """
    from peft.utils import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    return _add_str_enum_member(PeftType, name, f"{__name__}.add_peft_type_member")


def _add_str_enum_member(enum_cls: type[enum.Enum], name: str, function: str) -> enum.Enum:
    """Add a member ``name`` with value ``name`` to the ``(str, Enum)`` class ``enum_cls``, as `EnumType.__new__`
    adds the members of a class body; checked afterwards, and undone with a `PrivateAPIChanged` if it misbehaves."""
    member_names, member_map, value_map = (require_attr(enum_cls, attr, function) for attr in _ENUM_INTERNALS)
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(member_names)  # 3.11+: the definition order Flag and dir() sort by
    member_names.append(name)
    add_member = getattr(enum_cls, "_add_member_", None)  # 3.13+: class attribute (or redirect) and _member_map_
    if add_member is not None:
        add_member(name, member)
    else:
        type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to bind a member name
        member_map[name] = member
    value_map[name] = member
    try:
        behaves = (
            enum_cls(name) is member and enum_cls[name] is member and getattr(enum_cls, name) is member
            and list(enum_cls)[-1] is member and member.value == name and member == name
        )
    except (AttributeError, KeyError, ValueError):  # a look-up that misses raises rather than returning
        behaves = False
    if not behaves:
        member_names.remove(name)
        member_map.pop(name, None)
        value_map.pop(name, None)
        if name in vars(enum_cls):
            type.__delattr__(enum_cls, name)
        version = ".".join(map(str, sys.version_info[:3]))
        raise PrivateAPIChanged(
            f"{function}: adding {name!r} to {enum_cls.__qualname__} did not give a working member on Python {version} "
            f"(checked on 3.10-3.13); the enum layout changed. Please report this to hf_ext."
        )
    return member


__all__ = ["add_peft_type_member"]
