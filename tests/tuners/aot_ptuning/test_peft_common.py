"""PEFT's own common tests (`PeftCommonTester`, peft 0.21.2) on AoT P-Tuning, as PEFT runs them on its methods.

PEFT's four model test modules (tests/test_decoder_models.py, test_encoder_decoder_models.py,
test_feature_extraction_models.py, test_seq_classifier.py, fetched as pinned by tests/peer/fetch_peer_tests.py)
each run one test class over a table of Hub model ids and PEFT configs. Each class below is PEFT's class, run as
fetched, with that table swapped for ours: AoT configs for the task type and tiny models built in code and laid
out as Hub repositories (`hf_ext.testing.lay_out_as_hub_repo`) under the same kind of ids, so nothing reaches the
network. PEFT's test bodies, skips and assertions are unchanged. `AoTTableTests` adds the `PeftCommonTester`
checks that those four modules leave to PEFT's test_custom_models.py (loading with `low_cpu_mem_usage`, several
adapters loaded at once, adapter names that are substrings of each other, deleting an unknown adapter).

Default run: one model and one reparametrization per table (a different one in each table); the other models and
reparametrizations are marked slow (`python -m pytest -m slow tests/tuners`).

Skipped here, each with its reason:
- merge tests (test_merge_layers, test_merge_layers_multi, test_merge_layers_nan, test_merge_layers_fp16, and
  PeftCommonTester's _test_merge_layers_is_idempotent and _test_safe_merge, not added): an AoT bias depends on
  each position's token id, so it cannot be folded into the weights; `merge_and_unload()` refuses with a
  ValueError (tested in test_model.py::test_merge_refused_and_unload_restores_base), as PEFT skips methods that
  cannot merge (OSF, Lily, ShadowPEFT).
- test_passing_input_embeds_works (decoder table): AoT needs the token id of every position and refuses a forward
  pass given only `inputs_embeds`, with a ValueError (test_model.py::test_error_without_input_ids).
- test_lora_conversion (decoder table): an AoT bias is chosen by token id, not a weight delta, so there is nothing
  to convert to LoRA (`supports_lora_conversion()` is False, and PEFT's test would return without checking).
Skipped by PEFT's own test code, which runs these only for other methods (the messages are PEFT's):
- test_mixed_adapter_batches, test_generate_with_mixed_adapter_batches: "Mixed adapter batches not supported for
  this config" (PEFT runs them for LoRA only). AoT does serve mixed batches; test_model.py checks them, beam search
  included, against each example run alone.
- test_weighted_combination_of_adapters: LoRA and IA3 only.
- test_prompt_tuning_*, test_training_prompt_learning_tasks, test_passing_input_embeds_works (feature-extraction
  table): prompt-learning methods only.
- test_training_*_layer_indexing: "does not support layers_to_transform" (AoTPTuningConfig selects layers with
  `target_modules`).
- test_adding_multiple_adapters_with_bias_raises: "does not support the 'bias' argument".
- GPT-2 (slow): test_generate_half_prec and test_peft_model_device_map skip every method but LoRA/IA3/LoHa/LoKr on
  model ids containing "gpt2" ("does not support Conv1D layers"); AoT wraps whole blocks, not Conv1D, but the check
  is PEFT's.
Not table rows, so not run here: the tests in those classes that test other methods with configs of their own
(LoRA layer replication, prefix tuning on Qwen2, prompt learning with gradient checkpointing over a Hub dataset, a
LoRA-only test_load_model_low_cpu_mem_usage, which `AoTTableTests` replaces with the table's configs, ...).
"""

import types

import pytest
import torch
from peer_suites import peer_module

import hf_ext  # noqa: F401  (registers the PEFT type)
from hf_ext import AoTPTuningConfig
from hf_ext.testing import lay_out_as_hub_repo, tiny_causal_lm, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5

decoder = peer_module("peft_tests.test_decoder_models")
encoder_decoder = peer_module("peft_tests.test_encoder_decoder_models")
feature_extraction = peer_module("peft_tests.test_feature_extraction_models")
seq_classifier = peer_module("peft_tests.test_seq_classifier")
testing_utils = peer_module("peft_tests.testing_utils")

pytestmark = [
    # PEFT 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.25 deprecates
    # (FutureWarning): every get_peft_model on a transformers model warns, whatever the method. Not hf_ext's call.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # PEFT's test_*_gradient_checkpointing calls `model.gradient_checkpointing_enable`, renamed in transformers 5.25.
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]

slow = pytest.mark.slow
REPO = "hf-ext-testing/tiny-random-{}"


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=99, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    return BartForConditionalGeneration(config)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=4,
                       word_embed_proj_dim=16, max_position_embeddings=64)
    return OPTForCausalLM(config)


SMALL_ENCODER = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64)


def _encoder(name, head="Model", **kwargs):
    import transformers

    config = getattr(transformers, f"{name}Config")(**SMALL_ENCODER, **kwargs)
    return getattr(transformers, f"{name}{head}")(config)


def _llama_seq_cls():
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification(tiny_llama().config)


# repository id -> builder of the random tiny model it holds (PEFT's tables name the same architectures)
TINY_REPOS = {
    REPO.format("LlamaForCausalLM"): tiny_llama,
    REPO.format("GPT2LMHeadModel"): tiny_gpt2,
    REPO.format("OPTForCausalLM"): _opt,
    REPO.format("Qwen2ForCausalLM"): lambda: tiny_causal_lm("qwen2"),
    REPO.format("T5ForConditionalGeneration"): tiny_t5,
    REPO.format("BartForConditionalGeneration"): _bart,
    REPO.format("BertModel"): lambda: _encoder("Bert"),
    REPO.format("RobertaModel"): lambda: _encoder("Roberta"),
    REPO.format("DebertaModel"): lambda: _encoder("Deberta"),
    REPO.format("DebertaV2Model"): lambda: _encoder("DebertaV2"),
    REPO.format("RobertaForSequenceClassification"): tiny_roberta,
    REPO.format("BertForSequenceClassification"): lambda: _encoder("Bert", "ForSequenceClassification", num_labels=2),
    REPO.format("LlamaForSequenceClassification"): _llama_seq_cls,
}


@pytest.fixture(scope="module", autouse=True)
def tiny_hub(tmp_path_factory):
    """The tiny repositories in a Hub cache of their own, which `from_pretrained(repo_id)` reads offline."""
    import huggingface_hub

    cache = tmp_path_factory.mktemp("hub")
    for repo_id, build in TINY_REPOS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp("repo")
        build().save_pretrained(folder)
        lay_out_as_hub_repo(folder, repo_id, cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        for repo_id in TINY_REPOS:
            # PEFT's tests load a model id online the first time they meet it (`hub_online_once`), offline after.
            # These repositories are in the cache already: their first meeting is here, and it fetches nothing.
            with testing_utils.hub_online_once(repo_id):
                pass
        yield cache


def models(default: str, *others: str) -> list:
    """The table's model ids: `default` in the default run, the `others` marked slow."""
    return [REPO.format(default), *(pytest.param(REPO.format(name), marks=slow) for name in others)]


def aot_configs(task_type: str, default: str) -> list:
    """AoT configs for `task_type`, one per reparametrization; all but `default` marked slow."""
    kwargs = {"fc": {"fc_hidden_size": 8}, "kronecker": {"kronecker_rank": 3}, "none": {}}
    return [
        pytest.param(
            AoTPTuningConfig, {"task_type": task_type, "reparametrization": name, **extra}, id=f"aot-{name}",
            marks=() if name == default else slow,
        )
        for name, extra in kwargs.items()
    ]


MERGE_REFUSED = (
    "AoT P-Tuning biases depend on each position's token id and cannot be merged into the weights; "
    "merge_and_unload() refuses with a ValueError (test_model.py::test_merge_refused_and_unload_restores_base)."
)
NEEDS_INPUT_IDS = (
    "AoT P-Tuning chooses each bias by the position's token id, so a forward pass with `inputs_embeds` only is "
    "refused with a ValueError (test_model.py::test_error_without_input_ids)."
)
SKIPS = {
    "test_merge_layers": MERGE_REFUSED,
    "test_merge_layers_multi": MERGE_REFUSED,
    "test_merge_layers_nan": MERGE_REFUSED,
    "test_merge_layers_fp16": MERGE_REFUSED,
}

def _is_table_test(test) -> bool:
    """Whether `test` runs over its module's table: the model ids and `ALL_CONFIGS` of PEFT's test module (or the
    placeholders of `AoTTableTests`), rather than over a config list of its own."""
    params = {mark.args[0]: mark.args[1] for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize"}
    configs = params.get("config_cls,config_kwargs")
    return "model_id" in params and configs is not None and configs is test.__globals__.get("ALL_CONFIGS", [])


def _with_table(test, model_ids: list, configs: list, skip: str | None):
    """A copy of the test function `test` with the table's parametrization (`model_id`, `config_cls,config_kwargs`)
    swapped for ours; its other marks (e.g. `dtype`) kept."""
    copy = types.FunctionType(test.__code__, test.__globals__, test.__name__, test.__defaults__, test.__closure__)
    copy.__kwdefaults__, copy.__doc__, copy.__qualname__ = test.__kwdefaults__, test.__doc__, test.__qualname__
    table = {"model_id": model_ids, "config_cls,config_kwargs": configs}
    marks = [
        pytest.mark.parametrize(mark.args[0], table[mark.args[0]]).mark if mark.args[0] in table else mark
        for mark in test.pytestmark
    ]
    if skip is not None:
        marks.append(pytest.mark.skip(reason=skip).mark)
    copy.pytestmark = marks
    return copy


def aot_table(model_ids: list, configs: list, skips: dict[str, str]):
    """Class decorator: every test of the class that runs over its module's (model, config) table runs over ours
    instead; the other tests of PEFT's class (each about other methods, with configs of its own) are left out."""

    def swap(cls):
        for name in [name for name in dir(cls) if name.startswith("test_")]:
            test = getattr(cls, name)
            setattr(cls, name, _with_table(test, model_ids, configs, skips.get(name)) if _is_table_test(test) else None)
        return cls

    return swap


ALL_CONFIGS: list = []  # the placeholder table of `AoTTableTests`, which `aot_table` replaces
_PLACEHOLDER = [pytest.mark.parametrize("model_id", []), pytest.mark.parametrize("config_cls,config_kwargs", ALL_CONFIGS)]


def _table_test(test):
    """Mark one of `AoTTableTests`' tests as a table test; `aot_table` fills in the class's table."""
    for mark in reversed(_PLACEHOLDER):
        test = mark(test)
    return test


class AoTTableTests:
    """`PeftCommonTester` checks that PEFT's four model test modules do not call (PEFT's test_custom_models.py runs
    them on its own table), run here on each class's AoT table."""

    @_table_test
    def test_load_model_low_cpu_mem_usage(self, model_id, config_cls, config_kwargs):
        self._test_load_model_low_cpu_mem_usage(model_id, config_cls, config_kwargs.copy())

    @_table_test
    def test_load_multiple_adapters(self, model_id, config_cls, config_kwargs):
        self._test_load_multiple_adapters(model_id, config_cls, config_kwargs.copy())

    @_table_test
    def test_save_pretrained_adapter_name_substring(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained_adapter_name_substring(model_id, config_cls, config_kwargs.copy())

    @_table_test
    def test_delete_unknown_adapter_raises(self, model_id, config_cls, config_kwargs):
        self._test_delete_unknown_adapter_raises(model_id, config_cls, config_kwargs.copy())


@aot_table(
    models("LlamaForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM", "Qwen2ForCausalLM"),
    aot_configs("CAUSAL_LM", default="fc"),
    {
        **SKIPS,
        "test_passing_input_embeds_works": NEEDS_INPUT_IDS,
        "test_lora_conversion": "An AoT bias is chosen by token id, not a weight delta: nothing to convert to LoRA "
        "(`supports_lora_conversion()` is False).",
    },
)
class TestAoTDecoderModels(AoTTableTests, decoder.TestDecoderModels):
    """PEFT's tests/test_decoder_models.py (`AutoModelForCausalLM`) on AoT P-Tuning."""


@aot_table(
    models("T5ForConditionalGeneration", "BartForConditionalGeneration"),
    aot_configs("SEQ_2_SEQ_LM", default="kronecker"),
    SKIPS,
)
class TestAoTEncoderDecoderModels(AoTTableTests, encoder_decoder.TestEncoderDecoderModels):
    """PEFT's tests/test_encoder_decoder_models.py (`AutoModelForSeq2SeqLM`) on AoT P-Tuning."""


@aot_table(
    models("BertModel", "RobertaModel", "DebertaModel", "DebertaV2Model"),
    aot_configs("FEATURE_EXTRACTION", default="none"),
    SKIPS,
)
class TestAoTFeatureExtractionModels(AoTTableTests, feature_extraction.TestPeftFeatureExtractionModel):
    """PEFT's tests/test_feature_extraction_models.py (`AutoModel`) on AoT P-Tuning."""


@aot_table(
    models("RobertaForSequenceClassification", "BertForSequenceClassification", "LlamaForSequenceClassification"),
    aot_configs("SEQ_CLS", default="fc"),
    SKIPS,
)
class TestAoTSequenceClassificationModels(AoTTableTests, seq_classifier.TestSequenceClassificationModels):
    """PEFT's tests/test_seq_classifier.py (`AutoModelForSequenceClassification`) on AoT P-Tuning."""
