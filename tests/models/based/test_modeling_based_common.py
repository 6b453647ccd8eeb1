"""transformers' own common tests (`ModelTesterMixin`, `GenerationTesterMixin`, `ConfigTester`) on Based / ReBased.

The mixins are transformers 5.25.0's, fetched byte for byte and pinned by `python tests/peer/fetch_peer_tests.py`
(see tests/peer/); this file only describes the model to them, as transformers' tests/models/mamba/ and llama/ do.
Two layouts:

- `BasedConvFirstModelTest`: the paper's MQAR model (`BasedConfig.mqar`): a gated short convolution, then ReBased
  linear attention; learned positions, no MLP. Every cache layer is recurrent (Mamba's case).
- `BasedLinearFirstModelTest`: Based's Taylor linear attention, then rotary sliding-window attention, SwiGLU MLPs:
  a hybrid whose first cache layer holds only a recurrent state.

Skipped common tests, each as transformers skips it for models of this kind:

- In the conv-first layout, `test_attention_outputs` and the other attention tests skip themselves through
  `has_attentions = False`, as for Mamba: a convolution and linear attention have no attention weights to return.
  The linear-first layout returns its sliding-window layer's weights and overrides `test_attention_outputs` to count
  them, as transformers' hybrids (Qwen3-Next, OlmoHybrid) do.
- `test_model_rope_scaling_from_config_*` in the conv-first layout, as transformers skips it for models without
  RoPE: that layout has no sliding-window layer, so no rotary embedding (`rope_parameters` is present but unused);
  positions come from a learned table, which a 1.5x longer input overruns as in GPT-2.
- `test_generation_tester_mixin_tests` (the placeholder below) skips when `GenerationTesterMixin` is hf_ext's
  stand-in: transformers' sdist does not ship tests/generation/test_utils.py, so the generation tests run only where
  `fetch_peer_tests.py --source transformers=DIR` brought the real file.

With the real file (a copy of transformers older than 5.25, see fetch_peer_tests.py), four of its tests cannot run on
5.25 for any model and are skipped with that reason; test_modeling_based.py checks what they would:

- `test_assisted_decoding_matches_greedy_search_*` and `test_assisted_decoding_sample` read
  `PreTrainedModel._is_stateful`, which transformers 5.25 removed (AttributeError).
- `test_prompt_lookup_decoding_matches_greedy_search` carries `@is_flaky` without the call 5.25's `is_flaky` needs,
  and `test_generate_from_inputs_embeds` is a `pytest.mark` wrapped around what `parameterized.expand` left under
  the name: neither runs anything (their cases and test_modeling_based.py do).

Overridden (not skipped), as transformers' hybrids override them: `_check_past_key_values_for_generate` (Based's
cache layers differ by layer type) and, in the linear-first layout, `test_attention_outputs` and
`_check_attentions_for_generate` (one entry per sliding-window layer; a cached step sees the window only). The two
tests that pass `past_key_values=` to 5.25's `generate` ignore its FutureWarning.
"""

import unittest
from unittest import mock

import pytest
import torch
from parameterized import parameterized
from peer_suites import FETCH, is_stand_in, peer_module
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from hf_ext.models.based import BasedConfig, BasedForCausalLM, BasedModel

common = peer_module("transformers_tests.test_modeling_common")
configuration_common = peer_module("transformers_tests.test_configuration_common")
generation_utils = peer_module("transformers_tests.generation.test_utils")

ModelTesterMixin, ids_tensor, random_attention_mask = common.ModelTesterMixin, common.ids_tensor, common.random_attention_mask
GenerationTesterMixin = generation_utils.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester

LAYOUTS = {
    "conv_first": dict(
        layer_types=["conv", "linear_attention"], feature_map="rebased", use_mlp=False, use_learned_positions=True,
        conv_expand=1,
    ),
    "linear_first": dict(layer_types=["linear_attention", "sliding_attention"], feature_map="taylor", sliding_window=4),
}


class BasedModelTester:
    """Tiny configs and inputs for the common tests (hidden 32, 2 layers), in the manner of `MambaModelTester`."""

    def __init__(self, parent, layout: str, batch_size=13, seq_length=7, is_training=True, vocab_size=99,
                 hidden_size=32, num_attention_heads=2, feature_dim=8, intermediate_size=37, chunk_size=4,
                 max_position_embeddings=64):
        self.parent = parent
        self.layout = layout
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = len(LAYOUTS[layout]["layer_types"])
        self.num_attention_heads = num_attention_heads
        self.feature_dim = feature_dim
        self.intermediate_size = intermediate_size
        self.chunk_size = chunk_size  # smaller than `seq_length`: the chunked form crosses chunk boundaries
        self.max_position_embeddings = max_position_embeddings
        self.pad_token_id = self.bos_token_id = self.eos_token_id = vocab_size - 1

    def get_config(self, **overrides) -> BasedConfig:
        return BasedConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, feature_dim=self.feature_dim,
            intermediate_size=self.intermediate_size, chunk_size=self.chunk_size,
            max_position_embeddings=self.max_position_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, **{**LAYOUTS[self.layout], **overrides},
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class BasedModelTestMixin(ModelTesterMixin, GenerationTesterMixin):
    """What both layouts share; each `unittest.TestCase` below picks its layout."""

    layout: str
    all_model_classes = (BasedModel, BasedForCausalLM)
    # The mixin finds a model's year in a copyright line of its config file (Based has none) and exempts models
    # added before 2023; Based / ReBased are from 2024.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        # The mixins recognise a model's kind by its class name in transformers' tables of in-tree models (a causal LM
        # gets labels, a base model no training test). Based is registered with the Auto classes instead, so for
        # these tests it is added to the tables where an in-tree Based would be.
        for table, name in ((MODEL_MAPPING_NAMES, "BasedModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "BasedForCausalLM")):
            patch = mock.patch.dict(table, {"based": name})
            patch.start()
            cls.addClassCleanup(patch.stop)
        super().setUpClass()

    def setUp(self):
        self.model_tester = BasedModelTester(self, self.layout)
        self.config_tester = ConfigTester(self, config_class=BasedConfig, hidden_size=36, num_attention_heads=2)

    def test_config(self):
        self.config_tester.run_common_tests()

    # The deprecation shim's FutureWarning is what this test checks (it records it); the suite's "error" filter
    # would raise it instead.
    @pytest.mark.filterwarnings("always:`(past_key_values|cache_params)` is deprecated:FutureWarning")
    def test_bc_cache_name_forward(self):
        super().test_bc_cache_name_forward()

    if is_stand_in(generation_utils):

        def test_generation_tester_mixin_tests(self):
            self.skipTest(
                "GenerationTesterMixin is hf_ext's stand-in: transformers 5.25.0's sdist does not ship "
                f"tests/generation/test_utils.py; `{FETCH} --source transformers=DIR` brings it from a checkout"
            )

    else:  # the real GenerationTesterMixin, from the copy of the repository named in fetch_peer_tests.py

        def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
            # Overridden as transformers' hybrids (Qwen3-Next, OlmoHybrid) do: Based's cache layers differ by layer type.
            self.assertEqual(len(past_key_values.layers), config.num_hidden_layers)
            F, head_dim = config.feature_dim, config.hidden_size // config.num_attention_heads
            feature_size = F * F if config.feature_map == "rebased" else 1 + F + F * F
            for layer, layer_type in zip(past_key_values.layers, config.layer_types, strict=True):
                if layer_type == "sliding_attention":  # the last `sliding_window - 1` keys and values
                    kv_length = min(seq_length, config.sliding_window - 1)
                    for states in (layer.keys, layer.values):
                        self.assertEqual(states.shape, (batch_size, config.num_key_value_heads, kv_length, config.head_dim))
                elif layer_type == "conv":  # the last `conv_kernel_size` inputs of the convolution, no recurrent state
                    conv_shape = (batch_size, config.conv_expand * config.hidden_size, config.conv_kernel_size)
                    self.assertEqual(layer.conv_states[0].shape, conv_shape)
                    self.assertFalse(layer.is_recurrent_states_initialized[0])
                else:  # linear attention: the state [sum phi(k) v, sum phi(k)] per head, and a zero-width conv state
                    self.assertEqual(layer.recurrent_states[0].shape, (batch_size, config.num_attention_heads, feature_size, head_dim + 1))
                    self.assertEqual(layer.conv_states[0].shape, (batch_size, 0, 1))

        # transformers 5.25's `generate` deprecates the `past_key_values=` these two tests of the (older) copy of
        # GenerationTesterMixin pass to it: the peer test's call, hf_ext not involved.
        @pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated and will be removed in version 6.0.0:FutureWarning")
        def test_generate_continue_from_past_key_values(self):
            super().test_generate_continue_from_past_key_values()

        @pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated and will be removed in version 6.0.0:FutureWarning")
        def test_generate_continue_from_inputs_embeds(self):
            super().test_generate_continue_from_inputs_embeds()

        # Not tests in this copy of GenerationTesterMixin on transformers 5.25 (each runs nothing and returns a value):
        # `pytest.mark.generate` wraps what `parameterized.expand` left under the name (its cases `_0_greedy` and
        # `_1_beam_search` run), and `@is_flaky` is applied without the call 5.25's `is_flaky` needs.
        @unittest.skip(reason="Not a test here: the cases are test_generate_from_inputs_embeds_0_greedy and _1_beam_search")
        def test_generate_from_inputs_embeds(self):
            pass

        @unittest.skip(reason="`@is_flaky` without a call: never runs on 5.25; test_modeling_based.py tests prompt lookup")
        def test_prompt_lookup_decoding_matches_greedy_search(self):
            pass

        # This copy of GenerationTesterMixin skips assisted decoding when `model_class._is_stateful`, an attribute
        # transformers 5.25 removed (a linear cache now rolls back through `Cache.crop`); on 5.25 they raise
        # AttributeError for any model. test_modeling_based.py checks assisted decoding and prompt lookup against greedy.
        @parameterized.expand([("random",), ("same",)])
        @unittest.skip(reason="Reads PreTrainedModel._is_stateful, which transformers 5.25 removed")
        def test_assisted_decoding_matches_greedy_search(self, assistant_type):
            pass

        @unittest.skip(reason="Reads PreTrainedModel._is_stateful, which transformers 5.25 removed")
        def test_assisted_decoding_sample(self):
            pass


class BasedConvFirstModelTest(BasedModelTestMixin, unittest.TestCase):
    layout = "conv_first"
    has_attentions = False  # as Mamba: a convolution and linear attention return no attention weights

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    @unittest.skip(reason="This layout has no RoPE (no sliding-window layer; positions are a learned table)")
    def test_model_rope_scaling_from_config(self, scaling_type):
        pass


class BasedLinearFirstModelTest(BasedModelTestMixin, unittest.TestCase):
    layout = "linear_first"

    def _check_attentions_for_generate(
        self, batch_size, attentions, prompt_length, output_length, config, decoder_past_key_values
    ):
        # Overridden for the window: the generic check expects each cached step to attend to the whole sequence, but
        # the cache keeps `sliding_window - 1` keys, so a cached step attends to the last `sliding_window` positions.
        self.assertEqual(len(attentions), output_length - prompt_length)
        use_cache = decoder_past_key_values is not None
        for generated_length, step_attentions in enumerate(attentions):
            length = prompt_length + generated_length
            cached_step = use_cache and generated_length > 0
            expected = (batch_size, config.num_attention_heads, *((1, min(length, config.sliding_window)) if cached_step else (length, length)))
            self.assertEqual([a.shape for a in step_attentions], [expected] * config.layer_types.count("sliding_attention"))

    def test_attention_outputs(self):
        # Overridden as transformers' hybrids (Qwen3-Next, OlmoHybrid) do: only the sliding-window layer returns
        # attention weights, so there is one `attentions` entry per such layer, not per layer.
        _, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config = self.model_tester.get_config(attn_implementation="eager")  # only eager attention returns weights
        seq_len, window = self.model_tester.seq_length, config.sliding_window
        num_sliding = config.layer_types.count("sliding_attention")
        outside_window = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1) | torch.ones(
            seq_len, seq_len, dtype=torch.bool).tril(-window)
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            for request in ({"output_attentions": True}, {"output_attentions": True, "output_hidden_states": True}):
                with torch.no_grad():
                    outputs = model(**self._prepare_for_class(inputs_dict, model_class), **request)
                self.assertEqual(len(outputs.attentions), num_sliding)
                weights = outputs.attentions[0]
                self.assertEqual(list(weights.shape), [self.model_tester.batch_size, config.num_attention_heads, seq_len, seq_len])
                # a token's weights stay in its causal window (rows of padding tokens are left to the masking rules)
                is_token = inputs_dict["attention_mask"].bool()[:, None, :, None]
                self.assertTrue(torch.all(weights.masked_fill(~is_token, 0)[..., outside_window] == 0))
            self.assertIs(outputs[-1], outputs.attentions)  # attentions come last, after hidden_states
