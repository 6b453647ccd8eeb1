"""`hf_ext.atomic`: outputs appear whole or not at all, and the writers that use it.

A writer killed outright (SIGKILL) is tested on the real multi-file writer,
tests/merging/test_checkpoints.py::test_killed_writer_leaves_the_old_output_whole.
"""

import stat
from pathlib import Path

import pytest

from hf_ext.atomic import atomic_file, atomic_folder, check_output_folder


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_folder_appears_complete_with_ordinary_permissions(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # nothing at the destination until the block ends
        (tmp / "b.txt").write_text("b")
    assert _contents(tmp_path / "out") == {"a.txt": "a", "b.txt": "b"}
    assert _visible(tmp_path) == ["out"]  # no temporary left
    (tmp_path / "plain").mkdir()
    mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode  # not tempfile.mkdtemp's 0o700


def test_atomic_folder_failure_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise KeyboardInterrupt
    assert _contents(out) == {"a.txt": "old"} and _visible(tmp_path) == ["out"]
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _contents(out) == {"b.txt": "new"} and _visible(tmp_path) == ["out"]  # replaced whole, old one removed


def test_atomic_folder_replaces_only_what_it_may(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is always replaced
    with atomic_folder(out) as tmp:
        (tmp / "weights.bin").write_text("1")
    ran = []
    with pytest.raises(ValueError, match=r"`out_dir`=.*out' is not empty; pass overwrite=True to replace it"):
        with atomic_folder(out):
            ran.append(True)
    assert not ran  # checked before the block runs
    # a collection: a folder holding nothing but these names (an earlier output) is replaced
    with atomic_folder(out, overwrite=("weights.bin", "cfg.json")) as tmp:
        (tmp / "cfg.json").write_text("{}")
    assert _contents(out) == {"cfg.json": "{}"}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`folder`=.* holds files that writing there would delete: \['notes.txt'\]"):
        check_output_folder(out, overwrite=("cfg.json",), arg="folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`out_dir`=.*file' exists and is not a folder"):
        check_output_folder(tmp_path / "file", overwrite=True)
    assert _contents(out) == {"cfg.json": "{}", "notes.txt": "mine"}


def test_atomic_folder_refuses_a_destination_filled_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="is not empty"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("ours")
            out.mkdir()
            (out / "b.txt").write_text("another writer's")
    assert _contents(out) == {"b.txt": "another writer's"} and _visible(tmp_path) == ["out"]


def test_atomic_file(tmp_path):
    target = tmp_path / "card.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and _visible(tmp_path) == ["card.md"]
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        tmp.write_text("new")
    assert target.read_text() == "new" and _visible(tmp_path) == ["card.md"]
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)  # not mkstemp's 0o600


# ------------------------------------------------------------------------------------------- writers


def test_save_sae_replaces_a_previous_save_whole_and_refuses_other_files(tmp_path):
    from hf_ext.sae_match import load_sae, save_sae
    from hf_ext.sae_match.synthetic import random_sae

    jumprelu, topk = random_sae(16, 8, "jumprelu"), random_sae(16, 8, "topk", k=3, apply_b_dec_to_input=True)
    save_sae(jumprelu, tmp_path / "sae", format="saelens")
    save_sae(topk, tmp_path / "sae", format="sparsify")
    assert _visible(tmp_path / "sae") == ["cfg.json", "sae.safetensors"]  # no stale saelens weights beside them
    assert load_sae(tmp_path / "sae").activation == "topk"
    (tmp_path / "sae" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`folder`=.* holds files that writing there would delete: \['notes.txt'\]"):
        save_sae(jumprelu, tmp_path / "sae", format="gemma_scope")
    assert _visible(tmp_path / "sae") == ["cfg.json", "notes.txt", "sae.safetensors"]


def test_sae_match_cli_refuses_an_output_dir_with_other_files(tmp_path, capsys):
    from hf_ext.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["sae-match", "a", "b", "--output-dir", str(tmp_path / "out")]) == 2  # before loading anything
    assert "`--output-dir`=" in capsys.readouterr().err
    assert _visible(tmp_path / "out") == ["notes.txt"]
