"""The `hf-ext` command: help, exit codes, `env`."""

import subprocess
import sys

import pytest

from hf_ext.cli import _COMMANDS, main


def _hf_ext(*args):
    return subprocess.run([sys.executable, "-m", "hf_ext.cli", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    proc = _hf_ext("--help")
    assert proc.returncode == 0
    for name in _COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: hf-ext {command}" in capsys.readouterr().out


def test_no_command_and_unknown_command_exit_2(capsys):
    for argv in ([], ["no-such-command"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_env_prints_versions_and_device(capsys):
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    # the running build, whichever wheel gave it (the local CPU wheel's metadata says 2.13.0+cpu, PyPI's CUDA
    # wheel's says 2.14.1 while torch.__version__ is 2.14.1+cu130)
    expected = f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else torch.__version__
    assert f"- torch: {expected}\n" in out
    assert "- device: cpu" in out or "- device: cuda" in out


def test_version_flag(capsys):
    from hf_ext import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"hf-ext {__version__}"


def test_env_reports_the_running_cuda_build_not_the_wheel_metadata(monkeypatch, capsys):
    # PyPI's CUDA wheel: distribution version 2.14.1, torch.__version__ 2.14.1+cu130.
    import importlib.metadata

    import torch

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.14.1" if name == "torch" else real_version(name))
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert main(["env"]) == 0
    assert "- torch: 2.14.1+cu130 (CUDA 13.0)\n" in capsys.readouterr().out
