"""The offline test kit: tokenizer, tiny models, Hub-layout folders and subprocess reloads."""

import importlib.util
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from hf_ext.testing import (
    SPECIAL_TOKENS,
    get_tiny_bpe_tokenizer,
    get_tiny_tokenizer,
    lay_out_as_hub_repo,
    reload_in_subprocess,
    tiny_albert,
    tiny_causal_lm,
    tiny_corpus,
    tiny_ddlm,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_t5,
)


def test_tokenizer_special_tokens_and_round_trip(tiny_tokenizer):
    ids = [tiny_tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS.values()]
    assert ids == [0, 1, 2, 3, 4]
    assert tiny_tokenizer.pad_token == "<pad>" and tiny_tokenizer.mask_token == "<mask>"
    for sentence in tiny_corpus()[:50]:
        encoded = tiny_tokenizer(sentence)["input_ids"]
        assert tiny_tokenizer.unk_token_id not in encoded
        assert tiny_tokenizer.decode(encoded) == sentence


def test_tokenizer_is_deterministic_and_splits_punctuation(tiny_tokenizer):
    assert get_tiny_tokenizer().get_vocab() == tiny_tokenizer.get_vocab()
    tokens = tiny_tokenizer.tokenize("the film,was good!")
    assert tokens == ["the", "film", ",", "was", "good", "!"]
    assert tiny_tokenizer("zebra")["input_ids"] == [tiny_tokenizer.unk_token_id]


def test_tokenizer_chat_template(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "the food was bad"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>user : the food was bad </s><s>assistant :"


def test_tokenizer_left_padding():
    tokenizer = get_tiny_tokenizer(padding_side="left")
    batch = tokenizer(["the film is good", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist() == [0, 0, 0, tokenizer.convert_tokens_to_ids("a")]
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1]


def test_bpe_tokenizer_encodes_any_text_and_shares_the_special_tokens():
    tokenizer = get_tiny_bpe_tokenizer()
    assert [tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS.values()] == [0, 1, 2, 3, 4]
    assert len(tokenizer) == 510 and get_tiny_bpe_tokenizer().get_vocab() == tokenizer.get_vocab()
    for text in [*tiny_corpus()[:20], "zebra: Ünïcödé 🙂, tabs\tand  spaces"]:  # byte-level: nothing is unknown
        encoded = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in encoded and tokenizer.decode(encoded) == text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>user : hi </s>"


tiny_qwen2 = partial(tiny_causal_lm, "qwen2")


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama, tiny_roberta, tiny_albert, tiny_t5, tiny_qwen2, tiny_ddlm])
def test_tiny_models_match_the_tokenizer_and_are_seeded(builder, tiny_tokenizer):
    model = builder()
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    again = builder()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = builder(seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize(
    ("builder", "field"), [(tiny_gpt2, "n_layer"), (tiny_llama, "num_hidden_layers"), (tiny_roberta, "num_hidden_layers"),
                           (tiny_albert, "num_hidden_layers"), (tiny_t5, "num_layers"), (tiny_qwen2, "num_hidden_layers"),
                           (tiny_ddlm, "num_hidden_layers")]
)
def test_tiny_models_take_overrides_of_their_sizes(builder, field):
    assert getattr(builder(**{field: 3}).config, field) == 3


def test_tiny_ddlm_time_warp_is_not_the_initial_uniform_one():
    from hf_ext import DDLMModel

    model = tiny_ddlm()
    logits = model.time_warp.logits
    assert logits.shape == (8,) and logits.std() > 0.1
    initial = DDLMModel(model.config).time_warp.logits
    assert torch.equal(initial, torch.zeros(8))  # what the builder must move away from


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe", "lfm2"])
def test_tiny_causal_lm_builds_experts_and_layer_patterns_small(model_type):
    model = tiny_causal_lm(model_type)
    assert model.config.model_type == model_type and model.config.hidden_size == 16
    assert sum(p.numel() for p in model.parameters()) < 50_000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_hub_layout_loads_offline_by_repo_id(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "saved")
    snapshot = lay_out_as_hub_repo(tmp_path / "saved", "someone/tiny-gpt2", tmp_path / "cache")
    assert (snapshot / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path / "cache")
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_reload_in_subprocess_without_hf_ext():
    model = tiny_gpt2()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    outputs, class_name = reload_in_subprocess(
        model, {"input_ids": input_ids}, auto_class="AutoModelForCausalLM", hf_ext_importable=False
    )
    assert class_name == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    torch.testing.assert_close(outputs["logits"], expected, rtol=0, atol=0)


def _import_toy_remote():
    """Import tests/fixtures/toy_remote as a package so that transformers can copy its files."""
    folder = Path(__file__).parent / "fixtures" / "toy_remote"
    spec = importlib.util.spec_from_file_location("toy_remote", folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["toy_remote"] = package
    from toy_remote.configuration_toy import ToyConfig  # noqa: E402
    from toy_remote.modeling_toy import ToyModel  # noqa: E402

    return ToyConfig, ToyModel


def test_reload_in_subprocess_runs_remote_code_with_hf_ext_blocked():
    ToyConfig, ToyModel = _import_toy_remote()
    ToyConfig.register_for_auto_class()
    ToyModel.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())
    input_ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(input_ids).logits
    outputs, class_name = reload_in_subprocess(model, {"input_ids": input_ids}, hf_ext_importable=False, trust_remote_code=True)
    assert class_name.startswith("transformers_modules.") and class_name.endswith("modeling_toy.ToyModel")
    torch.testing.assert_close(outputs["logits"], expected, rtol=0, atol=0)


def test_reload_in_subprocess_reports_the_failure():
    ToyConfig, ToyModel = _import_toy_remote()
    ToyConfig.register_for_auto_class()
    ToyModel.register_for_auto_class("AutoModel")
    model = ToyModel(ToyConfig())
    with pytest.raises(RuntimeError, match="trust_remote_code"):
        reload_in_subprocess(model, {"input_ids": torch.tensor([[1]])}, hf_ext_importable=False, trust_remote_code=False)
