"""Model cards rendered from the templates carry the metadata the Hub reads, from a checkout and from an install."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import hf_ext
from hf_ext.model_card import available_templates, render_model_card, save_model_card

ROOT = Path(__file__).resolve().parents[1]

# One card per method whose artefact hf_ext writes itself. TR-DPO's trainer writes TRL's card and AoT P-Tuning's
# adapters PEFT's (each library's own mechanism; tests/trainers/test_trdpo.py and tests/tuners/aot_ptuning check them).
_ARXIV = {
    "based": "2402.10644", "palbert": "2204.03276", "ddlm": "2305.10818", "interpolation": "2211.12092",
    "sae_match": "2410.07656",
}


def test_one_template_per_method_with_a_card():
    assert set(_ARXIV) == set(available_templates())


@pytest.mark.parametrize("method", sorted(_ARXIV))
def test_rendered_metadata_parses_and_carries_the_fields(method):
    card = render_model_card(method, base_model="org/base", model_name="my-model", base="org/base", tuned="org/tuned", alpha=0.5)
    data = ModelCard(str(card)).data.to_dict()  # parse the rendered text back, as the Hub does
    assert data["library_name"]
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "org/base"
    assert {"hf-ext", method, f"arxiv:{_ARXIV[method]}"} <= set(data["tags"])
    assert f"arxiv.org/abs/{_ARXIV[method]}" in card.text
    assert "# my-model" in card.text


def test_pipeline_tag_where_the_method_has_one():
    assert ModelCard(str(render_model_card("based"))).data.pipeline_tag == "text-generation"
    assert ModelCard(str(render_model_card("palbert"))).data.pipeline_tag == "text-classification"


def test_extra_tags_are_appended_once():
    data = render_model_card("based", extra_tags=("mqar", "based")).data
    assert data.tags.count("based") == 1 and data.tags[-1] == "mqar"


def test_save_model_card_round_trips(tmp_path):
    path = save_model_card(tmp_path / "out", "interpolation", base_model="a/b", base="a/b", tuned="c/d", alpha=1.5)
    assert path == tmp_path / "out" / "README.md"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]  # no temporary file left
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "a/b"
    assert "--alpha 1.5" in loaded.text and "`c/d`" in loaded.text


def test_unknown_template_is_a_value_error():
    with pytest.raises(ValueError, match="No model card template for `method`='nope'"):
        render_model_card("nope")


def test_templates_are_the_top_level_model_cards_folder():
    assert available_templates() == sorted(p.stem for p in (ROOT / "model_cards").glob("*.md"))
    assert not (ROOT / "hf_ext" / "model_cards").exists()  # one place for the templates


def test_listed_packages_are_every_package_of_the_tree():
    """pyproject.toml lists the packages (model_cards/ is mapped into hf_ext, which `find` cannot discover)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_ext").rglob("__init__.py")}
    assert set(setuptools["packages"]) == tree | {"hf_ext.model_cards"}
    assert setuptools["package-dir"] == {"hf_ext.model_cards": "model_cards"}


_RENDER_EVERY_CARD = """
import json
import hf_ext
from hf_ext.model_card import available_templates, render_model_card

cards = {m: str(render_model_card(m, base_model="org/base", model_name="my-model", base="org/base", tuned="org/tuned", alpha=0.5))
         for m in available_templates()}
print(json.dumps({"hf_ext": hf_ext.__file__, "cards": cards}))
"""


@pytest.mark.slow
def test_fresh_non_editable_install_renders_every_card(tmp_path):
    """`pip install .` (not editable) into a new venv ships the templates: every card renders as from the checkout."""
    # 1. The files the package is built from, copied, so that the build writes nothing into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "hf_ext", "model_cards"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # 2. A new venv whose own site-packages come first; this environment's (torch, transformers, setuptools, ...)
    #    after them, through a .pth line (which does not run this environment's .pth files, e.g. an editable hf_ext).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    (purelib / "_hf_ext_test_shared_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # 3. A non-editable install, offline: no index, no build isolation, no dependencies.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
               "--no-index", "--quiet", str(src)]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 4. Render every card with the installed package, from outside the checkout.
    proc = subprocess.run([str(python), "-c", _RENDER_EVERY_CARD], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(installed["hf_ext"]).is_relative_to(purelib)  # the installed copy, not the checkout
    assert Path(hf_ext.__file__).is_relative_to(ROOT)
    expected = {m: str(render_model_card(m, base_model="org/base", model_name="my-model", base="org/base", tuned="org/tuned", alpha=0.5))
                for m in available_templates()}
    assert installed["cards"] == expected and set(expected) == {p.stem for p in (ROOT / "model_cards").glob("*.md")}
