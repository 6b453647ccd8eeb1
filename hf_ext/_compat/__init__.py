"""The one place where hf_ext touches private names of the libraries it extends.

transformers, PEFT, TRL, accelerate and huggingface_hub make no promise about their ``_private`` names, so a
release of any of them may break a touch. Each touch is a small named function in the module of its library
(`hf_ext._compat.transformers`, `.peft`, `.trl`, `.accelerate`, `.huggingface_hub`), decorated with
:func:`private_touch`, which records the version it was checked on, the public alternative (or why there is none),
both also appended to the function's docstring, and a probe: a side-effect-free check that the private names still
look the way the function assumes.

``tests/test_compat.py`` runs every probe against the installed versions, so an upgrade that breaks a touch fails
there first, with a message naming the function; at run time a touch that finds its private name gone raises
:class:`PrivateAPIChanged` naming the same function, never a bare ``AttributeError`` from deep inside.

Overriding a method that a base class documents as its subclass hook (``PreTrainedModel._init_weights``, PEFT's
``BaseTuner._create_and_replace``, ...) is how those libraries are meant to be extended and is not a touch.
"""

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from hf_ext.env import _installed_version


class PrivateAPIChanged(RuntimeError):
    """A private name hf_ext relies on is gone or changed shape in the installed version of its library."""


@dataclass(frozen=True)
class PrivateTouch:
    """One use of a peer library's private names.

    Args:
        function: qualified name of the compat function (``hf_ext._compat.peft.add_peft_type_member``).
        library: the distribution touched (``peft``).
        checked_on: the version of ``library`` the touch was checked on.
        names: the private names touched, as ``Owner._name``.
        public_alternative: the public API that would replace the touch, or why there is none yet.
        probe: raises :class:`PrivateAPIChanged` when the names are gone or changed; has no side effects.
    """

    function: str
    library: str
    checked_on: str
    names: tuple[str, ...]
    public_alternative: str
    probe: Callable[[], None]


PRIVATE_TOUCHES: dict[str, PrivateTouch] = {}


def private_touch(
    library: str, checked_on: str, names: tuple[str, ...], public_alternative: str, probe: Callable[[], None]
) -> Callable:
    """Record the decorated function as a touch of ``library``'s private ``names`` (see :class:`PrivateTouch`), and
    end its docstring with the version it was checked on and the public alternative."""

    def record(fn: Callable) -> Callable:
        qualname = f"{fn.__module__}.{fn.__qualname__}"
        PRIVATE_TOUCHES[qualname] = PrivateTouch(qualname, library, checked_on, names, public_alternative, probe)
        note = f"Checked on {library} {checked_on} (touches {', '.join(names)}). Public alternative: {public_alternative}"
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n{note}".lstrip()
        return fn

    return record


def require_attr(owner: object, name: str, function: str):
    """``getattr(owner, name)``, or :class:`PrivateAPIChanged` naming ``function`` when the name is gone."""
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = getattr(owner, "__qualname__", type(owner).__qualname__)
        raise PrivateAPIChanged(
            f"{function}: {owner_name}.{name} no longer exists in the installed version; "
            f"{_checked_note(function)} Please report this to hf_ext."
        ) from None


def _checked_note(function: str) -> str:
    touch = PRIVATE_TOUCHES.get(function)
    if touch is None:
        return ""
    installed = _installed_version(touch.library)
    return f"hf_ext checked it on {touch.library} {touch.checked_on} (installed: {installed})."


def load_all_touches() -> dict[str, PrivateTouch]:
    """Import every compat module (each registers its touches on import) and return the registry."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return PRIVATE_TOUCHES


def check_private_touches() -> list[str]:
    """Run every registered probe; returns one message per broken touch, each naming its function."""
    load_all_touches()
    failures = []
    for touch in PRIVATE_TOUCHES.values():
        try:
            touch.probe()
        except Exception as error:  # a probe may fail any way a changed library makes it fail
            failures.append(f"{touch.function} ({', '.join(touch.names)}): {error}")
    return failures


__all__ = ["PRIVATE_TOUCHES", "PrivateAPIChanged", "PrivateTouch", "check_private_touches", "load_all_touches", "private_touch", "require_attr"]
