"""Model cards rendered from the templates carry the metadata the Hub reads."""

import pytest
from huggingface_hub import ModelCard

from hf_ext.model_card import available_templates, render_model_card, save_model_card

_ARXIV = {
    "based": "2402.10644", "palbert": "2204.03276", "ddlm": "2305.10818", "aot_ptuning": "2305.10835",
    "trdpo": "2404.09656", "interpolation": "2211.12092", "sae_match": "2410.07656",
}


def test_every_method_with_a_saved_artifact_has_a_template():
    assert set(_ARXIV) <= set(available_templates())


@pytest.mark.parametrize("method", sorted(_ARXIV))
def test_rendered_metadata_parses_and_carries_the_fields(method):
    card = render_model_card(method, base_model="org/base", model_name="my-model", tuned_model="org/tuned", alpha=0.5)
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
    path = save_model_card(tmp_path / "out", "interpolation", base_model="a/b", tuned_model="c/d", alpha=1.5)
    assert path == tmp_path / "out" / "README.md"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]  # no temporary file left
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "a/b"
    assert "--alpha 1.5" in loaded.text and "`c/d`" in loaded.text


def test_unknown_template_is_a_value_error():
    with pytest.raises(ValueError, match="No model card template for `method`='nope'"):
        render_model_card("nope")
