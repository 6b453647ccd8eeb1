import json
import re

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification

TINY = dict(
    vocab_size=50, embedding_size=8, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=3
)


def test_defaults_are_the_papers():
    config = PalbertConfig(**TINY)
    assert config.model_type == "palbert"
    assert (config.exit_threshold, config.prior_lambda, config.beta) == (0.5, 0.1, 0.5)
    assert (config.lambda_head, config.lambda_head_layers, config.inference_mode) == ("revisited", 3, "q_exit")


@pytest.mark.parametrize(
    "field, value",
    [
        ("exit_threshold", 0.0), ("exit_threshold", 1.0), ("exit_threshold", 1.5), ("exit_threshold", -0.2),
        ("prior_lambda", 0.0), ("prior_lambda", 1.0), ("prior_lambda", 2),
        ("beta", -0.1),
        ("inference_mode", "greedy"),
        ("lambda_head", "rnn"),
        ("lambda_head_layers", -1),
    ],
)
def test_bad_values_are_rejected_by_strict_naming_the_field_and_value(field, value):
    # `@strict` runs `validate_pondering` and wraps its ValueError, as for transformers' own configs.
    message = rf"validator 'validate_pondering':\s+ValueError: `{field}` .*got {re.escape(repr(value))}\.$"
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        PalbertConfig(**TINY, **{field: value})


def test_wrong_type_is_rejected_by_strict():
    with pytest.raises(StrictDataclassFieldValidationError, match="Field 'exit_threshold' .* got str"):
        PalbertConfig(**TINY, exit_threshold="0.5")


def test_bad_value_in_a_saved_config_is_rejected_on_load(tmp_path):
    PalbertConfig(**TINY).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["exit_threshold"] = 1.2
    (tmp_path / "config.json").write_text(json.dumps(data))
    message = "`exit_threshold` must be in the open interval .* 1.2"
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        PalbertConfig.from_pretrained(tmp_path)


def test_bad_value_set_after_construction_is_not_saved(tmp_path):
    config = PalbertConfig(**TINY)
    config.prior_lambda = 1.0
    with pytest.raises(StrictDataclassClassValidationError, match="`prior_lambda` must be in the open interval"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_unknown_mode_in_forward_raises_before_any_work():
    model = PalbertForSequenceClassification(PalbertConfig(**TINY))
    with pytest.raises(ValueError, match="`inference_mode` must be one of .*'fastest'"):
        model(torch.ones(1, 4, dtype=torch.long), inference_mode="fastest")


def test_config_round_trip(tmp_path):
    config = PalbertConfig(**TINY, exit_threshold=0.7, prior_lambda=0.2, beta=0.0, lambda_head="linear", num_labels=3)
    config.save_pretrained(tmp_path)
    loaded = PalbertConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
