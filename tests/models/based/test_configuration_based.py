"""BasedConfig: presets, save/load, the cache layout it implies, and its errors."""

import pytest
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
    "kwargs, field",
    [
        (dict(feature_dim=0), "feature_dim"),
        (dict(feature_map="softmax"), "feature_map"),
        (dict(feature_norm="batch"), "feature_norm"),
        (dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(hidden_size=100, num_attention_heads=16), "hidden_size"),
        (dict(num_hidden_layers=3, layer_types=["conv", "linear_attention"]), "layer_types"),
        (dict(chunk_size=-1), "chunk_size"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BasedConfig(**kwargs)
