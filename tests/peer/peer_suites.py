"""Import the peer libraries' test suites that ``tests/peer/fetch_peer_tests.py`` brought in.

A test module does ``common = peer_module("transformers_tests.test_modeling_common")``; when the suite or one of
its files is absent, the whole module skips with a reason that names the missing file and the command that
brings it, rather than failing on an ``ImportError`` or passing with nothing run. A missing third-party module
is not skipped: it is an error (the ``test`` extra must install what the pinned suites import).
"""

import importlib
from pathlib import Path
from types import ModuleType

import pytest

SUITES_DIR = Path(__file__).resolve().parent / "_suites"
FETCH = "python tests/peer/fetch_peer_tests.py"


def peer_module(name: str) -> ModuleType:
    """Import ``name`` from the fetched suites, or skip the calling test module saying what is missing."""
    package = name.split(".", 1)[0]
    manifest = SUITES_DIR / package / "MANIFEST.txt"
    if not manifest.is_file():
        pytest.skip(f"peer suite {package} is not fetched; run `{FETCH}`", allow_module_level=True)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if not error.name or error.name.split(".", 1)[0] not in (package, "tests"):
            raise  # a library the suite imports is not installed: the test extra lacks it, a failure to fix
        missing = [line.removeprefix("missing ") for line in manifest.read_text().splitlines() if line.startswith("missing ")]
        reason = f"{name} needs {error.name}, which the fetched suite lacks"
        if missing:
            reason += f" (not fetched: {', '.join(missing)}; they come from a copy of the repository: `{FETCH} --source ...`)"
        pytest.skip(reason, allow_module_level=True)


def is_stand_in(module: ModuleType) -> bool:
    """Whether ``module`` is hf_ext's stand-in for a file the peer's sdist does not ship (see fetch_peer_tests.py)."""
    return getattr(module, "HF_EXT_STAND_IN", False)


__all__ = ["FETCH", "SUITES_DIR", "is_stand_in", "peer_module"]
