"""BasedConfig: presets, save/load, the cache layout it implies, and its errors."""

import json
import re

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, LinearAttentionLayer

from hf_ext.models.based import BasedConfig


def test_mqar_preset_is_the_papers_two_layer_model():
    config = BasedConfig.mqar(hidden_size=64, feature_map="taylor")
    assert config.layer_types == ["conv", "linear_attention"]
    assert (config.use_mlp, config.use_learned_positions, config.tie_word_embeddings) == (False, True, True)
    assert (config.vocab_size, config.feature_dim, config.conv_kernel_size) == (8192, 16, 3)
    assert config.num_attention_heads == 4 and config.feature_map == "taylor"


def test_based_360m_preset_places_linear_and_window_layers():
    config = BasedConfig.based_360m()
    linear = [i for i, t in enumerate(config.layer_types) if t == "linear_attention"]
    window = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    assert linear == [1, 6, 11, 16, 21] and window == [2, 7, 12, 17, 22]
    assert config.layer_types.count("conv") == 17
    assert (config.hidden_size, config.intermediate_size, config.feature_map) == (1024, 2048, "taylor")


def test_save_load_round_trip(tmp_path):
    config = BasedConfig.mqar(hidden_size=32, feature_norm="per_head", chunk_size=8)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is BasedConfig
    drop_path = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop_path(loaded.to_dict()) == drop_path(config.to_dict())


def test_dynamic_cache_layout_follows_layer_types():
    config = BasedConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, sliding_window=5,
                         layer_types=["conv", "linear_attention", "sliding_attention"])
    cache = DynamicCache(config=config)
    assert [type(layer) for layer in cache.layers] == [LinearAttentionLayer, LinearAttentionLayer, DynamicSlidingWindowLayer]
    assert cache.layers[2].sliding_window == 5


@pytest.mark.parametrize(
    "kwargs, validator, message",
    [
        (dict(feature_dim=0), "validate_sizes", "`feature_dim` must be a positive integer, got 0."),
        (dict(chunk_size=-1), "validate_sizes", "`chunk_size` must be a positive integer, got -1."),
        (dict(hidden_size=100, num_attention_heads=16), "validate_sizes",
         "`hidden_size` (100) must be divisible by `num_attention_heads` (16)."),
        (dict(num_attention_heads=4, num_key_value_heads=3), "validate_sizes",
         "`num_attention_heads` (4) must be divisible by `num_key_value_heads` (3)."),
        (dict(feature_map="softmax"), "validate_mixers", "`feature_map` must be one of ['rebased', 'taylor'], got 'softmax'."),
        (dict(feature_norm="batch"), "validate_mixers", "`feature_norm` must be one of ['joint', 'per_head'], got 'batch'."),
        (dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]), "validate_mixers",
         "`layer_types` contains unknown types ['full_attention']; allowed: ['linear_attention', 'sliding_attention', 'conv']."),
        (dict(sliding_window=0), "validate_mixers", "`sliding_window` must be a positive integer, got 0."),
        (dict(linear_attention_eps=-1.0), "validate_mixers", "`linear_attention_eps` must be >= 0, got -1.0."),
        # transformers' own check of `layer_types`
        (dict(num_hidden_layers=3, layer_types=["conv", "linear_attention"]), "validate_layer_type",
         "`num_hidden_layers` (3) must be equal to the number of `layer_types` (2)"),
    ],
)
def test_invalid_values_raise_strict_validation_errors(kwargs, validator, message):
    # As in transformers' own configs, `@strict` runs the `validate_*` methods and wraps their ValueError.
    expected = f"Class validation error for validator '{validator}':\n    ValueError: {message}"
    with pytest.raises(StrictDataclassClassValidationError, match=re.escape(expected)):
        BasedConfig(**kwargs)


def test_invalid_values_in_a_saved_config_raise_on_load(tmp_path):
    BasedConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "feature_map": "softmax"}))
    with pytest.raises(StrictDataclassClassValidationError, match="`feature_map` must be one of"):
        AutoConfig.from_pretrained(tmp_path)
