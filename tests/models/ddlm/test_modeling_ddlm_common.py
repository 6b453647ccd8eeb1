"""transformers' common model and config tests (`ModelTesterMixin`, `ConfigTester`) on `DDLMModel`/`DDLMConfig`.

The mixins are transformers' own test files, fetched byte-exact by `python tests/peer/fetch_peer_tests.py`; without
them this module skips, naming that command. The tester follows transformers' `tests/models/bert` and `llama`.

DDLM is a denoiser, not a causal LM: `DDLMModel.can_generate()` is False, so the class does not inherit
`GenerationTesterMixin` (the mixin's own `test_generation_tester_mixin_inheritance` requires exactly that).
Its forward draws the noise level and the noise when they are not given; the common inputs pass both (`sigma`,
`noise`), as ViTMAE's tests pass its random `noise`, so that two forward passes of the same inputs are comparable.
Training inputs carry `labels` (`_prepare_for_class`, as BERT's tests add its pretraining labels).

Common tests skipped here, each as transformers skips it for models whose inputs it cannot prepare (GlmImage:
"Needs special input preparation", Evolla, Videollama3):
- `test_eager_matches_sdpa_inference_*`: it passes only `input_ids` (plus `additional_model_inputs`) and fills any
  forward argument named `noise` with ViTMAE's patch noise of shape (batch, image_size // patch_size squared); DDLM's
  `noise` is the (B, T, embedding_dim) Gaussian noise, and without it the eager and SDPA models would each draw
  their own. Eager vs SDPA is checked instead by `test_modeling_ddlm.py::test_sdpa_matches_eager_outputs_and_gradients`
  (float32 outputs and gradients with padding, bfloat16 outputs).
The other common tests that do not apply to a model of this kind skip themselves inside the mixin (no
`inputs_embeds` argument, no generative head, no flash / flex attention declared, no accelerator, no rotary
embeddings, no multimodal features, ...), with the mixin's own reason in the pytest report (`-rs`).
"""

import unittest

import torch
from parameterized import parameterized
from peer_suites import peer_module

from hf_ext import DDLMConfig, DDLMModel

common = peer_module("transformers_tests.test_modeling_common")
ConfigTester = peer_module("transformers_tests.test_configuration_common").ConfigTester
ModelTesterMixin, ids_tensor, random_attention_mask = common.ModelTesterMixin, common.ids_tensor, common.random_attention_mask
torch_device = common.torch_device


class DDLMModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        vocab_size=99,
        embedding_dim=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=16,
        time_warp_bins=10,
        sigma_min=1.0,
        sigma_max=10.0,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.time_warp_bins = time_warp_bins
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def get_config(self):
        return DDLMConfig(
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            time_warp_bins=self.time_warp_bins,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        # the noise level and the standard normal noise, which the model would otherwise draw at each call
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.rand(self.batch_size, device=torch_device)
        noise = torch.randn(self.batch_size, self.seq_length, self.embedding_dim, device=torch_device)
        return self.get_config(), input_ids, input_mask, sigma, noise

    def create_and_check_model(self, config, input_ids, input_mask, sigma, noise):
        model = DDLMModel(config).to(torch_device).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, sigma=sigma, noise=noise)
            unmasked = model(input_ids, sigma=sigma, noise=noise)
        B, T = self.batch_size, self.seq_length
        self.parent.assertEqual(result.logits.shape, (B, T, self.vocab_size))
        self.parent.assertEqual(result.x0_hat.shape, (B, T, self.embedding_dim))
        torch.testing.assert_close(result.sigma, sigma)
        self.parent.assertFalse(result.conditioning_mask.any())  # eval: nothing is kept clean unless asked
        self.parent.assertIsNone(result.loss)
        # a row without padding does not depend on the mask of the others
        full_rows = input_mask.bool().all(-1)
        torch.testing.assert_close(result.logits[full_rows], unmasked.logits[full_rows])

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, sigma, noise = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids, "attention_mask": input_mask, "sigma": sigma, "noise": noise}
        return config, inputs_dict


class DDLMModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DDLMModel,)
    # the mixin dates a model by a "# Copyright <year>" line, which our files lack; DDLMModel is new, so it gets the
    # check every model added since 2023 gets (all weights initialised by `_init_weights`)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = DDLMModelTester(self)
        self.config_tester = ConfigTester(self, config_class=DDLMConfig, hidden_size=48, sigma_max=20.0)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:  # the denoising loss: cross-entropy against the clean tokens
            inputs_dict["labels"] = inputs_dict["input_ids"].clone()
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    @parameterized.expand(common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    @unittest.skip(reason="fills DDLM's `noise` argument with ViTMAE's patch noise; see the module docstring")
    def test_eager_matches_sdpa_inference(self, *args):
        pass
