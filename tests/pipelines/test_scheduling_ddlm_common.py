"""diffusers' own scheduler tests (`SchedulerCommonTest`, tests/schedulers/test_schedulers.py) on DDLMScheduler.

diffusers ships no tests in its sdist: `python tests/peer/fetch_peer_tests.py --source diffusers=<a diffusers
checkout or bare git dir>` brings the pinned files. Without them (CI reaches PyPI only) this module skips, naming
the missing files.

Skipped here, each overridden below with its reason:

- test_compatibles: `compatibles` resolves class names in the `diffusers` namespace, where DDLMScheduler is not, so
  the list is empty and the test's loop leaves `comp_scheduler` unbound (UnboundLocalError); no diffusers scheduler
  shares DDLM's config (a sigma range and halting thresholds) anyway.
- test_trained_betas: DDLM's noise is a continuous sigma range placed by the model's time warp, with no beta
  schedule (diffusers skips it for EDMEulerScheduler: "does not support beta schedules").
"""

import warnings

import torch
from peer_suites import peer_module

from hf_ext import DDLMScheduler

with warnings.catch_warnings():
    # diffusers' own tests/testing_utils.py chain imports `diffusers.utils.testing_utils`, which diffusers itself
    # deprecates (a FutureWarning at import); hf_ext is not involved
    warnings.filterwarnings("ignore", message="`diffusers.utils.testing_utils` is deprecated", category=FutureWarning)
    common = peer_module("diffusers_tests.schedulers.test_schedulers")


class DDLMSchedulerTest(common.SchedulerCommonTest):
    scheduler_classes = (DDLMScheduler,)
    forward_default_kwargs = (("num_inference_steps", 10),)

    def get_scheduler_config(self, **kwargs):
        return {"sigma_min": 1.0, "sigma_max": 10.0, **kwargs}

    def test_sigma_ranges(self):
        # the first step starts at sigma_max exactly (end points are exact whatever the warp)
        for sigma_min, sigma_max in [(1.0, 10.0), (0.5, 20.0), (1.0, 300.0)]:
            self.check_over_configs(time_step=sigma_max, sigma_min=sigma_min, sigma_max=sigma_max)

    def test_halting_configs(self):
        for config in [{"kl_threshold": 0.01}, {"halting_patience": 1}, {"halting_start_fraction": 0.0}]:
            self.check_over_configs(time_step=None, **config)

    def test_inference_steps(self):
        for num_inference_steps in [1, 10, 50]:
            self.check_over_forward(time_step=None, num_inference_steps=num_inference_steps)

    def test_full_loop_no_noise(self):
        """diffusers' full loop with its dummy model (x0_hat = x * sigma / (sigma + 1)), against the closed form
        x_N = x_0 * prod_i (1 + (sigma_{i+1} - sigma_i) / (sigma_i (sigma_i + 1))) in float64."""
        scheduler = DDLMScheduler(**self.get_scheduler_config())
        scheduler.set_timesteps(10)
        model = self.dummy_model()
        sample = self.dummy_sample_deter * scheduler.init_noise_sigma
        start = sample.double()
        for t in scheduler.timesteps:
            sample = scheduler.step(model(scheduler.scale_model_input(sample, t), t), t, sample).prev_sample
        sigmas = scheduler.sigmas.double()
        factor = torch.prod(1 + (sigmas[1:] - sigmas[:-1]) / (sigmas[:-1] * (sigmas[:-1] + 1)))
        torch.testing.assert_close(sample.double(), start * factor, rtol=1e-5, atol=1e-6)

    def test_compatibles(self):
        self.skipTest("`compatibles` looks names up in the diffusers namespace; DDLMScheduler has none to share with")

    def test_trained_betas(self):
        self.skipTest("no beta schedule: continuous sigma placed by the model's time warp")
