"""DDLMScheduler: step placement, Euler steps against hand-computed values, halting statistics, errors."""

import pytest
import torch

from hf_ext import DDLMScheduler


def test_set_timesteps_even_spacing_by_hand():
    scheduler = DDLMScheduler(sigma_min=1.0, sigma_max=10.0)
    scheduler.set_timesteps(3)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([10.0, 7.0, 4.0, 1.0]))
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([10.0, 7.0, 4.0]))
    assert scheduler.init_noise_sigma == 10.0


def test_set_timesteps_with_a_warp():
    scheduler = DDLMScheduler(sigma_min=2.0, sigma_max=6.0)
    scheduler.set_timesteps(4, inverse_cdf=lambda u: u**2)  # tau = u^2 at u = 1, .75, .5, .25, 0
    expected = 2.0 + 4.0 * torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0])
    torch.testing.assert_close(scheduler.sigmas, expected)


def test_euler_steps_by_hand():
    scheduler = DDLMScheduler(sigma_min=1.0, sigma_max=10.0)
    scheduler.set_timesteps(3)  # sigmas 10, 7, 4, 1
    x = torch.tensor([[[2.0, -1.0]]])
    x0 = torch.tensor([[[0.5, 0.5]]])
    # x + (sigma_next - sigma) * (x - x0) / sigma = [2, -1] + (-3) * [1.5, -1.5] / 10
    out = scheduler.step(x0, torch.tensor(10.0), x)
    torch.testing.assert_close(out.prev_sample, torch.tensor([[[1.55, -0.55]]]))
    # second step, 7 -> 4: [1.55, -0.55] + (-3) * [1.05, -1.05] / 7
    prev, _ = scheduler.step(x0, torch.tensor(7.0), out.prev_sample, return_dict=False)
    torch.testing.assert_close(prev, torch.tensor([[[1.1, -0.1]]]))
    assert scheduler.step_index == 2


def test_add_noise():
    scheduler = DDLMScheduler()
    x0, noise = torch.ones(2, 3, 4), torch.randn(2, 3, 4)
    noisy = scheduler.add_noise(x0, noise, timesteps=torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(noisy, torch.stack([1 + 2.0 * noise[0], 1 + 5.0 * noise[1]]))
    torch.testing.assert_close(scheduler.add_noise(x0, noise, 3.0), 1 + 3.0 * noise)


def test_halting_statistics_against_plain_formulas():
    scheduler = DDLMScheduler()
    torch.manual_seed(0)
    logits, previous = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    p, q = logits.softmax(-1), previous.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    switches = (logits.argmax(-1) != previous.argmax(-1)).float()
    for name, per_token in (("entropy", entropy), ("kl", kl), ("switches", switches)):
        expected = torch.stack([per_token[0, :2].mean(), per_token[1].mean()])
        torch.testing.assert_close(scheduler.halting_statistic(name, logits, previous, mask), expected)
    assert torch.isinf(scheduler.halting_statistic("kl", logits, None, mask)).all()


def test_save_load_config(tmp_path):
    scheduler = DDLMScheduler(sigma_min=0.5, sigma_max=20.0, kl_threshold=0.01, halting_patience=2)
    scheduler.save_pretrained(tmp_path)
    loaded = DDLMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="sigma_min"):
        DDLMScheduler(sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="halting_patience"):
        DDLMScheduler(halting_patience=0)
    with pytest.raises(ValueError, match="halting_start_fraction"):
        DDLMScheduler(halting_start_fraction=1.0)
    scheduler = DDLMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 1, 2), 10.0, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="early_exit"):
        scheduler.halting_statistic("perplexity", torch.zeros(1, 1, 2), None, torch.ones(1, 1, dtype=torch.bool))


def test_set_begin_index_places_the_first_step():
    scheduler = DDLMScheduler(sigma_min=1.0, sigma_max=10.0)
    scheduler.set_timesteps(3)  # sigmas 10, 7, 4, 1
    scheduler.set_begin_index(1)
    x, x0 = torch.tensor([[[2.0, -1.0]]]), torch.tensor([[[0.5, 0.5]]])
    # the step runs 7 -> 4 whatever `timestep` says: [2, -1] + (-3) * [1.5, -1.5] / 7
    out = scheduler.step(x0, torch.tensor(10.0), x)
    torch.testing.assert_close(out.prev_sample, torch.tensor([[[2.0 - 4.5 / 7, -1.0 + 4.5 / 7]]]))
    assert (scheduler.begin_index, scheduler.step_index) == (1, 2)
    scheduler.set_timesteps(3)  # a new schedule forgets the begin index
    assert scheduler.begin_index is None and scheduler.step_index is None
    with pytest.raises(ValueError, match="`begin_index` must be an integer >= 0, got -1"):
        scheduler.set_begin_index(-1)


def test_scale_model_input_is_the_identity():
    # DDLMModel applies c_in(sigma) = 1 / sqrt(sigma^2 + 1) inside `denoise`, so the scheduler scales nothing
    scheduler = DDLMScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(2, 3, 4)
    assert scheduler.scale_model_input(sample, scheduler.timesteps[0]) is sample
