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
    assert f"- torch: {torch.__version__}" in out
    assert "- device: cpu" in out or "- device: cuda" in out


def test_version_flag(capsys):
    from hf_ext import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"hf-ext {__version__}"
