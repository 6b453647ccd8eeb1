"""`hf-ext interpolate`: exit codes, outputs equal to the API's, and errors on stderr."""

import pytest
import torch
from safetensors.torch import load_file

from hf_ext.cli import main
from hf_ext.merging import interpolate_checkpoints
from hf_ext.testing import tiny_gpt2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_gpt2(seed=0).save_pretrained(root / "base")
    tiny_gpt2(seed=1).save_pretrained(root / "tuned")
    return root


def test_cli_writes_every_alpha_and_matches_the_api(saved, tmp_path, capsys):
    argv = ["interpolate", str(saved / "base"), str(saved / "tuned"), "--alpha", "0.5", "--alpha", "-1", "--out", str(tmp_path / "out")]
    assert main(argv + ["--shard-size", "20000"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / "alpha_0.5"), str(tmp_path / "out" / "alpha_-1")]
    api = interpolate_checkpoints(saved / "base", saved / "tuned", -1.0, tmp_path / "api")
    expected = load_file(api / "model.safetensors")
    got = {}
    for file in (tmp_path / "out" / "alpha_-1").glob("*.safetensors"):
        got.update(load_file(file))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_cli_exit_codes_on_bad_input(saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["interpolate", str(saved / "base"), str(saved / "tuned"), "--alpha", "2", "--out", str(out), "--no-progress"]) == 0
    # a second run into the same folder is refused (exit 2, message on stderr, no traceback)
    assert main(["interpolate", str(saved / "base"), str(saved / "tuned"), "--alpha", "2", "--out", str(out)]) == 2
    assert "hf-ext interpolate: error: `out_dir`=" in capsys.readouterr().err
    assert main(["interpolate", str(saved / "base"), str(saved / "tuned"), "--alpha", "nan", "--out", str(tmp_path / "x")]) == 2
    assert "`alpha` must be finite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --alpha is required
        main(["interpolate", str(saved / "base"), str(saved / "tuned"), "--out", str(tmp_path / "y")])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
