"""The pure parts of tests/peer/fetch_peer_tests.py: pin checks, --source reading, marker scan, suite writing."""

import dataclasses
import os
import subprocess

import fetch_peer_tests as fetch
import pytest
from fetch_peer_tests import SUITES, Suite, gather, pytest_markers, write_suite


def _suite(commit="", **repo_files):
    return Suite(library="demo", version="1.0", package="demo_tests", sdist_sha256=None, sdist_files={},
                 repo="someone/demo", commit=commit, repo_files=repo_files)


def _git(repo, *args):
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_the_test_extra_installs_the_pinned_peer_versions():
    # `pip install -e .[test]` must give the versions SUITES has pins for, or the fetch (and CI) stops at the next
    # peer release.
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    test_extra = [r for r in map(Requirement, requires("hf-ext")) if r.marker and r.marker.evaluate({"extra": "test"})]
    pinned = {r.name: str(r.specifier) for r in test_extra}
    assert {suite.library: pinned.get(suite.library) for suite in SUITES.values()} == {
        suite.library: f"=={suite.version}" for suite in SUITES.values()
    }


def test_marker_scan_lists_the_peers_own_markers_only():
    files = {
        "tests/a.py": b"@pytest.mark.generate\n@mark.flash_attn_test\n@pytest.mark.parametrize('x', [1])\n"
                      b"@pytest.mark.skipif(True, reason='r')\n@pytest.mark.generate\n",
        "tests/notes.txt": b"pytest.mark.not_python",
    }
    assert pytest_markers(files) == [
        "flash_attn_test: applied by the peer's own tests",
        "generate: applied by the peer's own tests",
    ]


def test_plain_source_files_are_checked_against_their_pins(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "a.py").write_bytes(b"A = 1\n")
    suite = _suite(**{"tests/a.py": fetch.sha256(b"A = 1\n")})
    assert gather(suite, tmp_path, tmp_path, check=True) == ({"tests/a.py": b"A = 1\n"}, [], [])
    assert gather(suite, None, tmp_path, check=True) == ({}, ["tests/a.py"], [])  # no --source: missing, no error

    (tmp_path / "tests" / "a.py").write_bytes(b"A = 2\n")
    with pytest.raises(SystemExit, match=r"demo: files differ from their pins \(the sdist of 1.0; --source files at "
                                         r"someone/demo@\):\n  tests/a.py: sha256 [0-9a-f]{64} \(pinned [0-9a-f]{64}\)"):
        gather(suite, tmp_path, tmp_path, check=True)
    files, _, _ = gather(suite, tmp_path, tmp_path, check=False)  # --print-hashes reads without checking
    assert files == {"tests/a.py": b"A = 2\n"}

    (tmp_path / "tests" / "a.py").unlink()
    with pytest.raises(SystemExit, match=rf"--source demo={tmp_path}: tests/a.py is neither in git at the pinned "
                                         r"commit someone/demo@ nor in that folder"):
        gather(suite, tmp_path, tmp_path, check=True)


def test_git_sources_are_read_at_the_pinned_commit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "tests" / "a.py").write_bytes(b"pinned\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "pinned")
    commit = _git(repo, "rev-parse", "HEAD")
    (repo / "tests" / "a.py").write_bytes(b"later\n")
    _git(repo, "commit", "-qam", "later")
    suite = _suite(commit, **{"tests/a.py": fetch.sha256(b"pinned\n")})
    for source in (repo, repo / ".git"):  # a checkout at another commit, a git directory
        assert gather(suite, source, tmp_path, check=True)[0] == {"tests/a.py": b"pinned\n"}


def test_a_suite_is_written_with_stand_ins_a_manifest_and_its_namespace_alias(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SUITES_DIR", tmp_path)
    suite = SUITES["transformers"]
    files = {"tests/test_modeling_common.py": b"REAL = True\n"}
    missing = ["tests/exporters/test_export.py", "tests/generation/test_utils.py"]
    root = write_suite(suite, files, missing, ["generate: applied by the peer's own tests"])

    assert root == tmp_path / "transformers_tests"
    assert (root / "test_modeling_common.py").read_bytes() == b"REAL = True\n"
    for path in ("exporters/test_export.py", "generation/test_utils.py", "utils/test_configuration_utils.py"):
        assert "HF_EXT_STAND_IN = True" in (root / path).read_text()
    assert all((folder / "__init__.py").is_file() for folder in (root, root / "exporters", root / "generation"))
    assert (root / "MANIFEST.txt").read_text().splitlines() == [
        "transformers 5.25.0", *(f"missing {p}" for p in missing),
        "stand-in tests/exporters/test_export.py", "stand-in tests/generation/test_utils.py",
        "stand-in tests/utils/test_configuration_utils.py",
    ]
    assert (root / "markers.txt").read_text() == "generate: applied by the peer's own tests\n"
    alias = tmp_path / "tests" / "exporters"
    assert alias.is_symlink() and not os.path.isabs(os.readlink(alias))  # relative: the folder may move
    assert alias.resolve() == (root / "exporters").resolve()

    # a real file replaces its stand-in, and a new fetch leaves nothing of the old one behind
    files["tests/generation/test_utils.py"] = b"class GenerationTesterMixin: ...\n"
    write_suite(suite, files, ["tests/exporters/test_export.py"], [])
    assert (root / "generation" / "test_utils.py").read_bytes() == b"class GenerationTesterMixin: ...\n"
    assert "stand-in tests/generation/test_utils.py" not in (root / "MANIFEST.txt").read_text()
    assert (root / "markers.txt").read_text() == ""
    assert alias.resolve() == (root / "exporters").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tests", "transformers_tests"]


def test_installed_versions_without_pins_stop_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SUITES_DIR", tmp_path)
    peft = SUITES["peft"]
    monkeypatch.setitem(SUITES, "peft", dataclasses.replace(peft, version="0.0.1"))
    installed = fetch.importlib.metadata.version("peft")
    with pytest.raises(SystemExit, match=rf"peft: the pinned suite is for 0.0.1, installed is {installed}\. Install "
                                         rf"peft==0.0.1, or pin {installed}'s files: set SUITES\['peft'\]\.version to "
                                         rf"'{installed}' in fetch_peer_tests.py and take the new pins from --print-hashes"):
        fetch.main(["--only", "peft"])
    monkeypatch.setitem(SUITES, "peft", dataclasses.replace(peft, library="hf-ext-no-such-distribution"))
    with pytest.raises(SystemExit, match="hf-ext-no-such-distribution is not installed; its suite is pinned for 0.21.2"):
        fetch.main(["--only", "peft"])


def test_an_sdist_pip_cannot_download_stops_with_a_clear_message(tmp_path, monkeypatch):
    # No index and an empty folder of links: pip fails at once, offline, as it does without PyPI.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(SystemExit, match=r"peft: pip could not download the source distribution peft==0\.21\.2 \(its "
                                         r"error is above\)\. This step needs PyPI"):
        fetch.download_sdist(SUITES["peft"], tmp_path, check=True)


def test_source_takes_lib_equals_an_existing_folder(tmp_path):
    with pytest.raises(SystemExit, match="--source takes LIB=DIR, got 'trl'"):
        fetch.main(["--source", "trl"])
    with pytest.raises(SystemExit, match=f"--source trl: {tmp_path / 'absent'} does not exist"):
        fetch.main(["--source", f"trl={tmp_path / 'absent'}"])


def test_peer_module_skips_for_a_file_not_fetched_and_fails_for_a_library_not_installed(tmp_path, monkeypatch):
    import peer_suites

    suite = tmp_path / "hf_ext_fake_tests"
    suite.mkdir()
    (suite / "__init__.py").touch()
    (suite / "MANIFEST.txt").write_text("fake 1.0\nmissing tests/absent.py\n")
    (suite / "needs_absent.py").write_text("from hf_ext_fake_tests.absent import anything\n")
    (suite / "needs_a_library.py").write_text("import hf_ext_no_such_library\n")
    monkeypatch.setattr(peer_suites, "SUITES_DIR", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"hf_ext_fake_tests.needs_absent needs hf_ext_fake_tests.absent, "
                                                    r"which the fetched suite lacks \(not fetched: tests/absent.py;"):
        peer_suites.peer_module("hf_ext_fake_tests.needs_absent")
    with pytest.raises(ModuleNotFoundError, match="hf_ext_no_such_library"):
        peer_suites.peer_module("hf_ext_fake_tests.needs_a_library")
    with pytest.raises(pytest.skip.Exception, match="peer suite hf_ext_other_tests is not fetched; run "):
        peer_suites.peer_module("hf_ext_other_tests.anything")
