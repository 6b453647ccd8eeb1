"""diffusers' own pipeline tests (`PipelineTesterMixin`, tests/pipelines/test_pipelines_common.py) on DDLMPipeline.

diffusers ships no tests in its sdist: `python tests/peer/fetch_peer_tests.py --source diffusers=<a diffusers
checkout or bare git dir>` brings the pinned files. Without them (CI reaches PyPI only) this module skips, naming
the missing files.

Skipped here, each overridden below with its reason (the mixin's own decorators also skip the float16, device,
offload and group-offload tests when no accelerator is present; CPU versions of the offload checks are below):

- test_attention_slicing_forward_pass, test_xformers_attention_forwardGenerator_pass: they switch diffusers'
  attention processors (`enable_attention_slicing`, xformers); DDLMModel is a transformers model with none, the
  case diffusers covers with `test_attention_slicing = False` / `test_xformers_attention = False`.
- test_num_images_per_prompt: returns without checking when `__call__` has no `num_images_per_prompt`; the same
  check for DDLM's `num_samples_per_prompt` is test_num_samples_per_prompt.
- test_cfg, test_callback_cfg: return without checking when there is no `guidance_scale`; CDCD/DDLM's sampler has
  no classifier-free guidance.
- test_encode_prompt_works_in_isolation: returns without checking when there is no `encode_prompt`; DDLM has no
  text encoder (a prompt is a clean prefix of the denoiser's own embeddings), so there is nothing to isolate.
- test_StableDiffusionMixin_component: returns without checking for pipelines that are not StableDiffusionMixin
  (no VAE or UNet).
- test_layerwise_casting_inference: casts `pipe.transformer`/`pipe.unet` with diffusers' ModelMixin
  `enable_layerwise_casting`; the denoiser here is a transformers model named `model`.
- test_group_offloading_inference: offloads only components named text_encoder*/transformer/unet/controlnet, so on
  DDLM it would compare two runs without offloading (pipeline-level group offloading is tested by
  test_pipeline_level_group_offloading_*, which need an accelerator).
"""

import unittest
import warnings
from unittest import mock

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from peer_suites import peer_module

from hf_ext import DDLMPipeline, DDLMScheduler
from hf_ext.testing import get_tiny_tokenizer, tiny_ddlm

with warnings.catch_warnings():
    # diffusers' own tests/models/testing_utils/lora.py imports `diffusers.utils.testing_utils`, which diffusers
    # itself deprecates (a FutureWarning at import); hf_ext is not involved
    warnings.filterwarnings("ignore", message="`diffusers.utils.testing_utils` is deprecated", category=FutureWarning)
    common = peer_module("diffusers_tests.pipelines.test_pipelines_common")


class DDLMPipelineFastTests(common.PipelineTesterMixin, unittest.TestCase):
    pipeline_class = DDLMPipeline
    params = frozenset(["prompt", "num_samples_per_prompt", "length", "num_inference_steps", "early_exit"])
    batch_params = frozenset(["prompt"])
    # diffusers' canonical optional arguments, with DDLM's per-prompt count in place of `num_images_per_prompt`
    required_optional_params = (common.PipelineTesterMixin.required_optional_params - {"num_images_per_prompt"}) | {
        "num_samples_per_prompt", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
    }

    def get_dummy_components(self):
        tokenizer = get_tiny_tokenizer()
        return {"model": tiny_ddlm(tokenizer=tokenizer), "scheduler": DDLMScheduler(), "tokenizer": tokenizer}

    def get_dummy_inputs(self, device, seed=0):
        generator_device = "cpu" if str(device).startswith("mps") else device
        return {
            "prompt": "the movie was",
            "length": 8,
            "num_inference_steps": 4,
            "generator": torch.Generator(device=generator_device).manual_seed(seed),
        }

    def get_unconditional_dummy_inputs(self, device, seed=0):
        inputs = DDLMPipelineFastTests.get_dummy_inputs(self, device, seed)
        del inputs["prompt"]
        return inputs

    def test_save_load_optional_components(self):
        # DDLM's one optional component, the tokenizer, is what encodes a prompt: without it the run is unconditional
        with mock.patch.object(self, "get_dummy_inputs", self.get_unconditional_dummy_inputs):
            super().test_save_load_optional_components()

    def test_num_samples_per_prompt(self):
        """diffusers' test_num_images_per_prompt for DDLM's argument: batch x per-prompt rows, each prompt's first."""
        pipe = self.pipeline_class(**self.get_dummy_components()).to(common.torch_device)
        pipe.set_progress_bar_config(disable=None)
        prompt_ids = pipe.tokenizer("the movie was", add_special_tokens=False)["input_ids"]
        for batch_size in (1, 2):
            for num_samples_per_prompt in (1, 2):
                inputs = self.get_dummy_inputs(common.torch_device)
                inputs["prompt"] = batch_size * [inputs["prompt"]]
                sequences = pipe(**inputs, num_samples_per_prompt=num_samples_per_prompt)[0]
                assert sequences.shape == (batch_size * num_samples_per_prompt, 8)
                assert sequences[:, : len(prompt_ids)].tolist() == [prompt_ids] * len(sequences)

    def test_model_cpu_offload_on_cpu(self):
        """The offload tests above need an accelerator; on CPU: same output, and the offload hook fires on the
        model's sampling calls (`denoise` and `embed` are not `forward`)."""
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        plain = pipe(**self.get_dummy_inputs("cpu"))[0]
        pipe.enable_model_cpu_offload(device="cpu")
        offloaded = pipe(**self.get_dummy_inputs("cpu"))[0]
        assert torch.equal(plain, offloaded)

        class CountCalls(ModelHook):
            calls = 0

            def pre_forward(self, module, *args, **kwargs):
                CountCalls.calls += 1
                return args, kwargs

        pipe.remove_all_hooks()
        add_hook_to_module(pipe.model, CountCalls())
        pipe(**self.get_dummy_inputs("cpu"))
        assert CountCalls.calls == 1 + 4  # the embeddings, then one `denoise` per step

    def test_weights_reached_only_through_hooked_calls(self):
        """What `enable_sequential_cpu_offload` needs, on CPU: every module's own weights wait on the meta device
        and are put back only for a call through its hook, and the output does not change. (accelerate's own
        sequential hook cannot run with a CPU execution device: 1.16 fails re-wrapping the weight as `Tensor`.)"""

        class MetaUntilCalled(ModelHook):
            execution_device = torch.device("cpu")  # where diffusers' `_execution_device` looks

            def init_hook(self, module):
                self.weights = dict(module.named_parameters(recurse=False))
                self.post_forward(module, None)
                return module

            def pre_forward(self, module, *args, **kwargs):
                for name, weight in self.weights.items():
                    module.register_parameter(name, weight)
                return args, kwargs

            def post_forward(self, module, output):
                for name, weight in self.weights.items():
                    module.register_parameter(name, torch.nn.Parameter(weight.to("meta"), requires_grad=False))
                return output

        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        plain = pipe(**self.get_dummy_inputs("cpu"))[0]
        for module in pipe.model.modules():
            add_hook_to_module(module, MetaUntilCalled())
        assert pipe.model.embed_tokens.weight.device.type == "meta"
        assert torch.equal(pipe(**self.get_dummy_inputs("cpu"))[0], plain)
        assert pipe.model.embed_tokens.weight.device.type == "meta"

    def test_attention_slicing_forward_pass(self):
        self.skipTest("diffusers' attention slicing switches diffusers attention processors; DDLMModel has none")

    def test_xformers_attention_forwardGenerator_pass(self):
        self.skipTest("xformers attention switches diffusers attention processors; DDLMModel has none")

    def test_num_images_per_prompt(self):
        self.skipTest("no `num_images_per_prompt`; the same check for `num_samples_per_prompt`: test_num_samples_per_prompt")

    def test_cfg(self):
        self.skipTest("no classifier-free guidance (`guidance_scale`) in CDCD/DDLM's sampler")

    def test_callback_cfg(self):
        self.skipTest("no classifier-free guidance (`guidance_scale`) in CDCD/DDLM's sampler")

    def test_encode_prompt_works_in_isolation(self):
        self.skipTest("no text encoder: a prompt is a clean prefix of the denoiser's own embeddings")

    def test_StableDiffusionMixin_component(self):
        self.skipTest("not a StableDiffusionMixin pipeline (no VAE or UNet)")

    def test_layerwise_casting_inference(self):
        self.skipTest("casts pipe.transformer/pipe.unet with diffusers' ModelMixin; DDLM's denoiser is a transformers model")

    def test_group_offloading_inference(self):
        self.skipTest("offloads only text_encoder*/transformer/unet/controlnet components; DDLM's denoiser is `model`")

