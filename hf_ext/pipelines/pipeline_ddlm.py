"""DDLM pipeline: sample text from a CDCD-style continuous diffusion LM, halting each sample early.

Sampling follows CDCD (Dieleman et al., arXiv:2211.15089): start from Gaussian latents at
sigma_max, evaluate the model (with self-conditioning on its previous x0 estimate), take an Euler step
of the probability-flow ODE with the score from x0_hat, and read the tokens as the argmax of the last
prediction. Prompt tokens are a clean prefix: their latents are their embeddings and never move.
Early exit follows DDLM ("Diffusion Language Models Generation Can Be Halted Early", arXiv:2305.10818):
a sample stops as soon as its halting criterion fires and later steps skip it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from hf_ext.models.ddlm.modeling_ddlm import DDLMModel, interpolate_embeddings
from hf_ext.pipelines.scheduling_ddlm import HALTING_CRITERIA, DDLMScheduler

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from hf_ext import DDLMConfig, DDLMModel, DDLMPipeline, DDLMScheduler
        >>> from hf_ext.testing import get_tiny_tokenizer

        >>> tokenizer = get_tiny_tokenizer()
        >>> config = DDLMConfig(vocab_size=len(tokenizer), embedding_dim=16, hidden_size=32, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
        >>> pipe = DDLMPipeline(model=DDLMModel(config), scheduler=DDLMScheduler(), tokenizer=tokenizer)
        >>> pipe.set_progress_bar_config(disable=True)
        >>> out = pipe(num_samples=2, length=12, num_inference_steps=20, prompt="the movie", early_exit="switches",
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.sequences.shape, len(out.texts), out.steps_used.shape
        (torch.Size([2, 12]), 2, torch.Size([2]))

        ```
"""


@dataclass
class DDLMPipelineOutput(BaseOutput):
    """Output of [`DDLMPipeline`].

    Args:
        texts (`list[str]` or None):
            Decoded samples (prompt included, special tokens skipped); None without a tokenizer.
        sequences (`torch.LongTensor` of shape `(B, length)`):
            Token ids of the samples, prompt included.
        steps_used (`torch.LongTensor` of shape `(B,)`):
            Model evaluations each sample took (`num_inference_steps` unless it halted early).
    """

    texts: list[str] | None
    sequences: torch.LongTensor
    steps_used: torch.LongTensor


class DDLMPipeline(DiffusionPipeline):
    r"""Text generation with a [`DDLMModel`] and a [`DDLMScheduler`], with per-sample early exit.

    Args:
        model ([`DDLMModel`]): the denoiser.
        scheduler ([`DDLMScheduler`]): Euler steps and halting criteria.
        tokenizer (a transformers tokenizer, *optional*): encodes prompts and decodes samples.
    """

    model: DDLMModel
    scheduler: DDLMScheduler
    tokenizer: object

    model_cpu_offload_seq = "model"
    _optional_components = ["tokenizer"]
    _callback_tensor_inputs = ["latents", "x0_hat", "logits", "tokens", "halted", "steps_used"]

    def __init__(self, model: DDLMModel, scheduler: DDLMScheduler, tokenizer=None):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, tokenizer=tokenizer)

    @property
    def num_timesteps(self) -> int:
        """Number of Euler steps of the last call."""
        return self._num_timesteps

    def check_inputs(self, num_samples, length, num_inference_steps, prompt, early_exit, callback_on_step_end_tensor_inputs):
        """Raise ValueError/TypeError on bad arguments, before any work."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
        max_length = self.model.config.max_position_embeddings
        if not isinstance(length, int) or not 1 <= length <= max_length:
            raise ValueError(f"`length` must be an integer in [1, {max_length}] (the model's max_position_embeddings), got {length!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if early_exit is not None and early_exit not in HALTING_CRITERIA:
            raise ValueError(f"`early_exit` must be one of {HALTING_CRITERIA} or None, got {early_exit!r}.")
        # the time warp maps u to tau in the model's noise range; another range would misplace every step
        model_range = (self.model.config.sigma_min, self.model.config.sigma_max)
        scheduler_range = (self.scheduler.config.sigma_min, self.scheduler.config.sigma_max)
        if model_range != scheduler_range:
            raise ValueError(
                f"The scheduler's noise range (sigma_min, sigma_max)={scheduler_range} must equal the model's "
                f"{model_range}, the range its time warp was fitted on; build the scheduler with the model's values."
            )
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
                raise TypeError(f"`prompt` must be a string, a list of strings or None, got {type(prompt).__name__}.")
            if isinstance(prompt, list) and not prompt:
                raise ValueError("`prompt` must be a non-empty list of strings, a string or None, got [].")
            if self.tokenizer is None:
                raise ValueError("`prompt` needs a tokenizer; the pipeline has none.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
                )

    def _encode_prompts(self, prompt, length) -> list[list[int]]:
        """Token ids of each prompt, without special tokens; ValueError when one leaves nothing to generate."""
        prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else prompt
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in prompts]
        for text, ids in zip(prompts, encoded, strict=True):
            if len(ids) >= length:
                raise ValueError(
                    f"`prompt` {text!r} is {len(ids)} tokens, which leaves nothing to generate in `length`={length}; "
                    "use a shorter prompt or a larger length."
                )
        return encoded

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        num_samples: int = 1,
        length: int | None = None,
        num_inference_steps: int = 200,
        prompt: str | list[str] | None = None,
        early_exit: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DDLMPipelineOutput | tuple:
        r"""Sample `num_samples` sequences of `length` tokens (per prompt).

        Args:
            num_samples (`int`, defaults to 1):
                Samples per prompt (or in all, without a prompt).
            length (`int`, *optional*):
                Tokens per sample, prompt included; at most, and by default, the model's `max_position_embeddings`
                (DDLM and CDCD: 64).
            num_inference_steps (`int`, defaults to 200):
                Euler steps (CDCD samples with 200), placed by the model's time warp.
            prompt (`str` or `list[str]`, *optional*):
                Prefix(es) kept clean while the rest is generated; must be shorter than `length` tokens.
            early_exit (`str`, *optional*):
                Halting criterion, one of `"entropy"`, `"switches"`, `"kl"` (thresholds in the scheduler's
                config), or None to run every step.
            generator (`torch.Generator`, *optional*):
                Makes the initial latents, hence the whole (deterministic) ODE solve, reproducible.
            return_dict (`bool`, defaults to `True`):
                Return a [`DDLMPipelineOutput`] rather than a tuple `(texts, sequences, steps_used)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`; a returned
                `"latents"` replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Keys of `callback_kwargs`, from `_callback_tensor_inputs` (defaults to `["latents"]`).

        Examples:

        Returns:
            [`DDLMPipelineOutput`] or `tuple`.
        """
        # 1. check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        length = self.model.config.max_position_embeddings if length is None else length
        self.check_inputs(num_samples, length, num_inference_steps, prompt, early_exit, callback_on_step_end_tensor_inputs)
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        prompt_ids = self._encode_prompts(prompt, length)

        # 2. prompt prefix: token ids and a conditioning mask (True = clean), num_samples rows per prompt
        device, dtype = self._execution_device, self.model.dtype
        prompt_tokens, conditioning_mask = self._prepare_prefix(prompt_ids, num_samples, length, device)
        tokens, batch_size = prompt_tokens.clone(), prompt_tokens.shape[0]
        embeddings = self.model.embedding_matrix()  # (V, d)
        clean = embeddings[prompt_tokens]  # (B, L, d)

        # 3. noise levels, placed by the model's learned time warp (CDCD, time warping)
        self.scheduler.set_timesteps(num_inference_steps, device=device, inverse_cdf=self.model.time_warp.inverse_cdf)
        timesteps = self.scheduler.timesteps

        # 4. initial latents x ~ N(0, sigma_max^2 I); the prompt prefix is clean
        shape = (batch_size, length, self.model.config.embedding_dim)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        latents = torch.where(conditioning_mask[..., None], clean, latents)

        # 5. denoising loop; halted samples are left out of later model calls
        x0_hat = torch.zeros_like(latents)  # self-conditioning input, zeros at the first step
        last_logits = None  # (B, L, V) each sample's latest prediction
        halted = torch.zeros(batch_size, dtype=torch.bool, device=device)
        streak = torch.zeros(batch_size, dtype=torch.long, device=device)
        steps_used = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                active = (~halted).nonzero().squeeze(1)  # (A,)
                cond = conditioning_mask[active]
                logits, latents[active], x0_hat[active] = self._euler_step(
                    t, latents[active], x0_hat[active] if i > 0 else None, cond, clean[active], embeddings
                )  # logits (A, L, V)
                tokens[active] = torch.where(cond, prompt_tokens[active], logits.argmax(-1))
                steps_used[active] += 1

                if early_exit is not None:
                    halted, streak = self._update_halting(early_exit, i, logits, last_logits, active, ~cond, halted, streak)
                if last_logits is None:
                    last_logits = torch.zeros(batch_size, *logits.shape[1:], dtype=logits.dtype, device=device)
                last_logits[active] = logits

                if callback_on_step_end is not None:
                    callback_kwargs = {
                        "latents": latents, "x0_hat": x0_hat, "logits": last_logits, "tokens": tokens, "halted": halted,
                        "steps_used": steps_used,
                    }
                    callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

                progress_bar.update()
                if halted.all():
                    break

        # 6. decode
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return texts, tokens, steps_used
        return DDLMPipelineOutput(texts=texts, sequences=tokens, steps_used=steps_used)

    def _prepare_prefix(self, prompt_ids, num_samples, length, device):
        """`(B, L)` token ids (prompt, then padding) and `(B, L)` conditioning mask (True on the prompt)."""
        batch_size = len(prompt_ids) * num_samples
        tokens = torch.full((batch_size, length), self.model.config.pad_token_id or 0, dtype=torch.long, device=device)
        conditioning_mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        for row in range(batch_size):
            ids = prompt_ids[row // num_samples]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            conditioning_mask[row, : len(ids)] = True
        return tokens, conditioning_mask

    def _euler_step(self, t, latents, self_conditioning, conditioning_mask, clean, embeddings):
        """Model call, score interpolation's x0_hat (CDCD) and one Euler step, for the active rows.

        Returns `(logits (A, L, V), latents at the next sigma (A, L, d), x0_hat (A, L, d))`.
        """
        logits = self.model.denoise(latents, t.expand(len(latents)), self_conditioning, conditioning_mask)
        x0_hat = interpolate_embeddings(logits, embeddings)
        # the prompt's x0 is its clean embedding, so dx/dsigma = 0 there and the prefix stays clean
        step_target = torch.where(conditioning_mask[..., None], clean, x0_hat)
        return logits, self.scheduler.step(step_target, t, latents).prev_sample, x0_hat

    def _update_halting(self, criterion, step, logits, previous_logits, active, generation_mask, halted, streak):
        """DDLM's early exit: a sample halts once its criterion has held `halting_patience` checked steps in a row."""
        previous = None if previous_logits is None else previous_logits[active]
        statistic = self.scheduler.halting_statistic(criterion, logits, previous, generation_mask)  # (A,)
        holds = (statistic <= self.scheduler.halting_threshold(criterion)) & self.scheduler.halting_checked(step)
        streak, halted = streak.clone(), halted.clone()
        streak[active] = torch.where(holds, streak[active] + 1, torch.zeros_like(streak[active]))
        halted[active] = streak[active] >= self.scheduler.config.halting_patience
        return halted, streak


__all__ = ["DDLMPipeline", "DDLMPipelineOutput"]
