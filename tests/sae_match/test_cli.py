"""`hf-ext sae-match`: outputs and exit codes."""

import json

import torch

from hf_ext.cli import main
from hf_ext.sae_match import LayerMatchings, save_sae
from hf_ext.sae_match.synthetic import planted_chain
from hf_ext.testing import lay_out_as_hub_repo


def _write_chain(root, n_layers=3):
    saes, truths = planted_chain(n_layers=n_layers, n_features=64, d_model=16, noise=0.1, seed=0)
    subfolders = [f"layer_{i}/width_16k/average_l0_{50 + i}" for i in range(n_layers)]
    for sae, sub in zip(saes, subfolders, strict=True):
        save_sae(sae, root / sub, format="gemma_scope")
    return subfolders, truths


def test_local_folders_write_matchings_summary_and_plot(tmp_path):
    subfolders, truths = _write_chain(tmp_path / "saes")
    out = tmp_path / "out"
    code = main(["sae-match", *[str(tmp_path / "saes" / s) for s in subfolders], "--output-dir", str(out),
                 "--method", "sparse", "--k", "8", "--threshold", "0.05", "--plot", "--no-progress"])
    assert code == 0
    chain = LayerMatchings.load(out / "matchings.safetensors")
    for m, truth in zip(chain.matchings, truths, strict=True):
        assert torch.equal(m.permutation, truth)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_features"], summary["d_model"], summary["method"], summary["formats"]) == (64, 16, "sparse", ["gemma_scope"] * 3)
    assert summary["pairs"][0]["total_cost"] == chain.matchings[0].total
    assert summary["persistence"]["mean_layers_survived"][0] == float(chain.persistence(0.05)[0].double().mean())
    assert (out / "persistence.png").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "arxiv:2410.07656" in card and "k = 8 candidates" in card and subfolders[2] in card
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_hub_repo_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    subfolders, truths = _write_chain(tmp_path / "repo", n_layers=2)
    lay_out_as_hub_repo(tmp_path / "repo", "google/gemma-scope-2b-pt-res", tmp_path / "cache")
    out = tmp_path / "out"
    code = main(["sae-match", "--repo", "google/gemma-scope-2b-pt-res", *subfolders, "--cache-dir", str(tmp_path / "cache"),
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert torch.equal(LayerMatchings.load(out / "matchings.safetensors").matchings[0].permutation, truths[0])
    # a repository that is not in the cache cannot be fetched offline: exit status 1
    code = main(["sae-match", "--repo", "nobody/nothing", "a", "b", "--cache-dir", str(tmp_path / "cache"),
                 "--output-dir", str(out), "--no-progress"])
    assert code == 1


def test_bad_input_exit_code_2(tmp_path, capsys):
    subfolders, _ = _write_chain(tmp_path / "saes", n_layers=2)
    locs = [str(tmp_path / "saes" / s) for s in subfolders]
    out = str(tmp_path / "out")
    assert main(["sae-match", locs[0], "--output-dir", out]) == 2
    assert "at least two SAE locations" in capsys.readouterr().err
    assert main(["sae-match", *locs, "--output-dir", out, "--method", "hungarian"]) == 2
    assert main(["sae-match", *locs, "--output-dir", out, "--format", "pickle"]) == 2
    assert main(["sae-match", *locs, "--output-dir", out, "--plot"]) == 2
    assert main(["sae-match", locs[0], str(tmp_path / "missing"), "--output-dir", out, "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()  # nothing written on bad input
