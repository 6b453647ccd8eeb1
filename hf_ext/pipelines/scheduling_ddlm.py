"""DDLM scheduler: Euler steps on the probability-flow ODE of CDCD, and DDLM's halting criteria.

CDCD ("Continuous diffusion for categorical data", Dieleman et al., arXiv:2211.15089)
samples by integrating dx/dsigma = -sigma * score(x, sigma) = (x - x0_hat) / sigma, where score
interpolation gives score = (x0_hat - x) / sigma^2. One Euler step from sigma_i to sigma_{i+1} is

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - x0_hat) / sigma_i.

The steps sit at sigma_i = sigma_min + (sigma_max - sigma_min) * F^-1(1 - i / N), with F the model's
learned time-warp CDF (CDCD, time warping), or evenly spaced without one.

DDLM ("Diffusion Language Models Generation Can Be Halted Early", arXiv:2305.10818 v2+) stops a sample
when its prediction has settled. The paper's three criteria are not verified here (see PAPERS.md);
the definitions and thresholds below are our reading of them:

- ``"entropy"``: the mean entropy of the predicted token distributions is at most `entropy_threshold`;
- ``"switches"``: the share of tokens whose argmax changed since the previous step is at most
  `switch_threshold`;
- ``"kl"``: the mean KL(p_i || p_{i-1}) between consecutive predictions is at most `kl_threshold`;

each for `halting_patience` steps in a row, checked from step `halting_start_fraction * N` on.

The start is our guard, not the paper's. At high noise the prediction is close to the unigram
distribution whatever the latents, so it barely moves between steps: for the demo's tiny model (100 steps),
the KL between consecutive predictions stays around 1e-4 and about 1% of tokens switch over the first steps,
while only 25-40% of the tokens are already the final ones. The change-based criteria ("switches", "kl") read
that plateau as convergence: with thresholds calibrated on the end of a full run and no guard, they halted
after 4-6 of 100 steps with 24% of tokens as in the full run (start 0.25: 31-37 steps, 47-56%; start 0.5:
60-80 steps, 81-89%). `"entropy"` is not fooled (the entropy is near its maximum on the plateau) and gave the
same 94 steps at every start. The guard caps the saving at `1 - halting_start_fraction` of the steps (50% by
default, above the 10-40% the paper reports); set it to 0 for the criteria exactly as stated above.

The default thresholds are guesses for a trained model, and the change-based ones depend on the step count:
on a smooth trajectory the KL between consecutive predictions shrinks roughly as 1/N^2 and the share of
switching tokens as 1/N, so calibrate them at the `num_inference_steps` you sample with (the demo reads them off
the last 10% of a full run; with the defaults, the tiny model of `examples/ddlm_train.py --tiny` halts with
"kl" as soon as the guard allows).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

HALTING_CRITERIA = ("entropy", "switches", "kl")


@dataclass
class DDLMSchedulerOutput(BaseOutput):
    """Output of [`DDLMScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(B, T, d)`):
            The latents at the next, lower noise level.
        pred_original_sample (`torch.Tensor` of shape `(B, T, d)`):
            The x0_hat the step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """`(B, T)` entropy in nats of softmax(logits)."""
    log_probs = logits.float().log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def _kl(logits: torch.Tensor, previous_logits: torch.Tensor) -> torch.Tensor:
    """`(B, T)` KL(softmax(logits) || softmax(previous_logits)) in nats."""
    log_p, log_q = logits.float().log_softmax(-1), previous_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class DDLMScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for CDCD/DDLM's probability-flow ODE, with DDLM's early-exit checks.

    Time is continuous: the model trains at noise levels drawn from its time warp, so unlike diffusers'
    discrete-time schedulers there is no `num_train_timesteps`, no `__len__` and no beta schedule.

    Args:
        sigma_min (`float`, defaults to 1.0):
            Lowest noise level, where sampling ends. DDLM's range [1, 10] is a third-party report,
            NOT VERIFIED (CDCD uses [1, 300]).
        sigma_max (`float`, defaults to 10.0):
            Highest noise level, where sampling starts.
        entropy_threshold (`float`, defaults to 0.15):
            `"entropy"` criterion: halt when the mean per-token entropy (nats) is at most this.
        switch_threshold (`float`, defaults to 0.0):
            `"switches"` criterion: halt when at most this share of tokens changed their argmax.
        kl_threshold (`float`, defaults to 0.002):
            `"kl"` criterion: halt when the mean KL (nats) between consecutive predictions is at most this.
        halting_patience (`int`, defaults to 3):
            How many consecutive steps a criterion must hold before a sample halts.
        halting_start_fraction (`float`, defaults to 0.5):
            Share of the steps taken before any criterion is checked, in [0, 1). Our guard against the
            high-noise plateau, not the paper's; it caps the saving at `1 - halting_start_fraction` (see above).

    Example:

    ```python
    >>> from hf_ext import DDLMScheduler
    >>> scheduler = DDLMScheduler(sigma_min=1.0, sigma_max=10.0)
    >>> scheduler.set_timesteps(3)
    >>> [round(sigma, 4) for sigma in scheduler.sigmas.tolist()]
    [10.0, 7.0, 4.0, 1.0]

    ```
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 1.0,
        sigma_max: float = 10.0,
        entropy_threshold: float = 0.15,
        switch_threshold: float = 0.0,
        kl_threshold: float = 0.002,
        halting_patience: int = 3,
        halting_start_fraction: float = 0.5,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"`sigma_min` must be > 0 and < `sigma_max`, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        if halting_patience < 1:
            raise ValueError(f"`halting_patience` must be >= 1, got {halting_patience}.")
        if not 0.0 <= halting_start_fraction < 1.0:
            raise ValueError(f"`halting_start_fraction` must be in [0, 1), got {halting_start_fraction}.")
        for name, value in (("entropy_threshold", entropy_threshold), ("switch_threshold", switch_threshold),
                            ("kl_threshold", kl_threshold)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        self.num_inference_steps = None
        self.sigmas = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial Gaussian latents: the first step's sigma."""
        return float(self.sigmas[0]) if self.sigmas is not None else self.config.sigma_max

    @property
    def step_index(self) -> int | None:
        """Index of the next step (None before the first `step` after `set_timesteps`)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, set by a pipeline with `set_begin_index`; None: the first `step` finds it from
        its `timestep`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next run of `step` calls at step `begin_index` (diffusers' convention; `set_timesteps` clears it)."""
        if not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"`begin_index` must be an integer >= 0, got {begin_index!r}.")
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Returns `sample` unchanged: [`DDLMModel`] scales its input by c_in(sigma) = 1 / sqrt(sigma^2 + 1) itself
        (EDM preconditioning inside `denoise`), so unlike `EulerDiscreteScheduler` nothing is scaled here. Kept for
        interchangeability with diffusers' schedulers."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        inverse_cdf: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """Place `num_inference_steps` Euler steps between `sigma_max` and `sigma_min`.

        Args:
            num_inference_steps: number of Euler steps (model evaluations), >= 1.
            device: where `sigmas` and `timesteps` live.
            inverse_cdf: maps u in [0, 1] to normalised time tau in [0, 1] (the model's time warp,
                `model.time_warp.inverse_cdf`); identity when None, i.e. evenly spaced sigmas.

        Sets `sigmas` (`(N + 1,)`, decreasing from `sigma_max` to `sigma_min`) and `timesteps`
        (`(N,)`, the sigma each step starts from; CDCD's time is the noise level itself).
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        u = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        tau = u if inverse_cdf is None else inverse_cdf(u).float().cpu()
        tau = torch.cat([tau.new_ones(1), tau[1:-1], tau.new_zeros(1)])  # end points exact, whatever the warp
        sigma_min, sigma_max = self.config.sigma_min, self.config.sigma_max
        self.sigmas = (sigma_min + tau * (sigma_max - sigma_min)).to(device)
        self.timesteps = self.sigmas[:-1]
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: float | torch.Tensor
    ) -> torch.Tensor:
        """x_sigma = x0 + sigma * eps (CDCD). `timesteps` are noise levels sigma (a float or `(B,)`), named as in
        diffusers' `add_noise(original_samples, noise, timesteps)` since this scheduler's time is sigma itself."""
        sigmas = torch.as_tensor(timesteps, dtype=original_samples.dtype, device=original_samples.device)
        return original_samples + sigmas.reshape(-1, *([1] * (original_samples.ndim - 1))) * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDLMSchedulerOutput | tuple:
        """One Euler step of the probability-flow ODE: x + (sigma_next - sigma) * (x - x0_hat) / sigma.

        Args:
            model_output: `(B, T, d)` x0_hat, the score-interpolation estimate of the clean embeddings.
            timestep: the current sigma (an entry of `timesteps`); it places the first step unless `set_begin_index`
                did, later steps follow in order.
            sample: `(B, T, d)` current latents x at `timestep`.
            return_dict: return a [`DDLMSchedulerOutput`] (default) or a tuple.

        Returns:
            [`DDLMSchedulerOutput`] with `prev_sample` `(B, T, d)` at the next sigma.
        """
        if self.sigmas is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._step_index = self._index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"All {self.num_inference_steps} steps were taken; call `set_timesteps` again.")
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        x = sample.float()
        derivative = (x - model_output.float()) / sigma  # dx/dsigma = -sigma * score
        prev_sample = (x + (sigma_next - sigma) * derivative).to(sample.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, model_output
        return DDLMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=model_output)

    def _index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep`={float(timestep)} is not one of the scheduler's timesteps.")
        return int(matches[0])

    def halting_statistic(
        self,
        criterion: str,
        logits: torch.Tensor,
        previous_logits: torch.Tensor | None,
        generation_mask: torch.BoolTensor,
    ) -> torch.Tensor:
        """The per-sample quantity a criterion thresholds, averaged over generated positions.

        Args:
            criterion: one of ``"entropy"``, ``"switches"``, ``"kl"``.
            logits: `(B, T, V)` this step's predictions.
            previous_logits: `(B, T, V)` the previous step's, or None at the first step.
            generation_mask: `(B, T)` True at positions being generated (not the prompt).

        Returns:
            `(B,)` statistic; +inf where it is undefined (no previous step for switches and KL).
        """
        if criterion not in HALTING_CRITERIA:
            raise ValueError(f"`early_exit` must be one of {HALTING_CRITERIA} or None, got {criterion!r}.")
        weights = generation_mask.float()
        counts = weights.sum(-1).clamp(min=1)
        if criterion == "entropy":
            return (_entropy(logits) * weights).sum(-1) / counts
        if previous_logits is None:
            return torch.full((logits.shape[0],), float("inf"), device=logits.device)
        if criterion == "switches":
            switched = (logits.argmax(-1) != previous_logits.argmax(-1)).float()
            return (switched * weights).sum(-1) / counts
        return (_kl(logits, previous_logits) * weights).sum(-1) / counts

    def halting_checked(self, step: int) -> bool:
        """Whether the criteria are checked at 0-based `step` (from `halting_start_fraction` of the steps on)."""
        return step >= self.config.halting_start_fraction * self.num_inference_steps

    def halting_threshold(self, criterion: str) -> float:
        """The config threshold of `criterion`."""
        if criterion not in HALTING_CRITERIA:
            raise ValueError(f"`early_exit` must be one of {HALTING_CRITERIA} or None, got {criterion!r}.")
        return {"entropy": self.config.entropy_threshold, "switches": self.config.switch_threshold,
                "kl": self.config.kl_threshold}[criterion]


__all__ = ["HALTING_CRITERIA", "DDLMScheduler", "DDLMSchedulerOutput"]
