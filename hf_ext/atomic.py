"""Outputs that appear whole or not at all: the one temp-then-rename writer of hf_ext.

Everything hf_ext writes (interpolated checkpoints, SAE files, `hf-ext sae-match` outputs, model cards) is
written under a hidden temporary name beside its final place and renamed into place when complete:

- :func:`atomic_file`: one file, renamed over its destination with ``os.replace``;
- :func:`atomic_folder`: a whole folder (weights, index, config, card, ...), written into a sibling folder that
  is renamed to the destination, so a reader sees the old folder or the complete new one, never a mix.

A writer that raises (or is interrupted by ``KeyboardInterrupt``) removes its temporary; one that is killed
outright leaves it behind under its hidden name (``.<name>.tmp-<hex>``), and the destination untouched.
"""

import errno
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

_MAX_LISTED = 5  # entries quoted in an error message


def _hidden_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there, and it replaces ``path`` when the block ends.

    The temporary is not created in advance, so the file gets the permissions of any file its writer creates.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with atomic_file(target) as tmp:
        ...     _ = tmp.write_text("complete")
        >>> target.read_text()
        'complete'
    """
    path = Path(path)
    tmp = _hidden_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_folder(path: str | os.PathLike, *, overwrite: bool | Collection[str] = False, arg: str = "out_dir") -> Path:
    """Return ``path`` as a ``Path`` if a new output folder may be written there, else raise ValueError.

    Args:
        path: the destination folder.
        overwrite: which existing folder may be replaced. ``False``: none (``path`` must be missing or an empty
            folder); ``True``: any; a collection of file names: one holding nothing but these names (a previous
            output of the same writer), so that nothing else is ever deleted.
        arg: the argument name quoted in errors.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{arg}`={str(path)!r} exists and is not a folder.")
    if overwrite is True or not path.is_dir():
        return path
    entries = sorted(p.name for p in path.iterdir())
    if not overwrite and entries:
        raise ValueError(f"`{arg}`={str(path)!r} is not empty; pass overwrite=True to replace it.")
    replaceable = set(overwrite or ())
    others = [name for name in entries if name not in replaceable]
    if others:
        raise ValueError(
            f"`{arg}`={str(path)!r} holds files that writing there would delete: {others[:_MAX_LISTED]}; "
            "choose a new or empty folder."
        )
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool | Collection[str] = False, arg: str = "out_dir") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; fill it, and it becomes ``path`` when the block ends.

    ``path`` is checked with :func:`check_output_folder` before the block runs. On success the folder is
    renamed into place; a folder already at ``path`` is first renamed aside and deleted after (two renames:
    POSIX cannot swap a non-empty folder in one, so a process killed between them leaves the old output under
    ``.<name>.old-<hex>`` and no ``path``). If the block raises, the temporary folder is removed and ``path``
    is left as it was.

    Args:
        path: the destination folder (its parent is created if needed).
        overwrite: which existing folder may be replaced (see :func:`check_output_folder`).
        arg: the argument name quoted in errors.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_folder(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("a"); _ = (tmp / "b.txt").write_text("b")
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt', 'b.txt']
    """
    path = check_output_folder(path, overwrite=overwrite, arg=arg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, "tmp")
    tmp.mkdir()  # not tempfile.mkdtemp, whose 0o700 would become the output's permissions
    try:
        yield tmp
        check_output_folder(path, overwrite=overwrite, arg=arg)  # again: another writer may have been at `path` meanwhile
        _rename_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, path: Path) -> None:
    try:
        os.rename(tmp, path)  # path is missing or an empty folder: one atomic rename
        return
    except OSError as err:  # a non-empty folder (ENOTEMPTY / EEXIST), or any folder on Windows
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = _hidden_sibling(path, "old")
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_file", "atomic_folder", "check_output_folder"]
