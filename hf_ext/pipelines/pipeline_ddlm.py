"""DDLM pipeline: sample text from a CDCD-style continuous diffusion LM, halting each sample early.

Sampling follows CDCD (Dieleman et al., arXiv:2211.15089): start from Gaussian latents at
sigma_max, evaluate the model (with self-conditioning on its previous x0 estimate), take an Euler step
of the probability-flow ODE with the score from x0_hat, and read the tokens as the argmax of the last
prediction. Prompt tokens are a clean prefix: their latents are their embeddings and never move.
Early exit follows DDLM ("Diffusion Language Models Generation Can Be Halted Early", arXiv:2305.10818):
a sample stops as soon as its halting criterion fires and later steps skip it.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor

from hf_ext.models.ddlm.modeling_ddlm import DDLMModel, interpolate_embeddings
from hf_ext.pipelines.scheduling_ddlm import HALTING_CRITERIA, DDLMScheduler

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("text", "seq", "latent")

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
        >>> out = pipe(prompt=["the movie", "a film"], num_samples_per_prompt=2, length=12, num_inference_steps=20,
        ...            early_exit="switches", generator=torch.Generator().manual_seed(0))
        >>> out.sequences.shape, len(out.texts), out.steps_used.shape
        (torch.Size([4, 12]), 4, torch.Size([4]))

        ```
"""


@dataclass
class DDLMPipelineOutput(BaseOutput):
    """Output of [`DDLMPipeline`]. Fields left None are left out of `out[i]` and `to_tuple()`, which is what
    `return_dict=False` returns: `(sequences, steps_used, texts)`, `(sequences, steps_used)` without texts, and
    `(latents, steps_used)` with `output_type="latent"`.

    Args:
        sequences (`torch.LongTensor` of shape `(B, length)`):
            Token ids of the samples, prompt included; None with `output_type="latent"`.
        latents (`torch.Tensor` of shape `(B, length, embedding_dim)`):
            The latents after the last Euler step (at `sigma_min`, prompt positions clean); only with
            `output_type="latent"`.
        steps_used (`torch.LongTensor` of shape `(B,)`):
            Model evaluations each sample took (`num_inference_steps` unless it halted early).
        texts (`list[str]`):
            Decoded samples (prompt included, special tokens skipped); only with `output_type="text"` and a tokenizer.
    """

    sequences: torch.LongTensor | None = None
    latents: torch.Tensor | None = None
    steps_used: torch.LongTensor | None = None
    texts: list[str] | None = None


@apply_forward_hook
def _call_on_device(module: torch.nn.Module, method: str, *args):
    """`module.<method>(*args)` after the module's offload hook (if any) has put its weights on the execution device.

    The model's sampling entry points (`denoise`, `embed`, `time_warp.inverse_cdf`) are not `forward`, so the hooks
    of `enable_model_cpu_offload` / `enable_sequential_cpu_offload` would not fire on them by themselves; diffusers
    runs `vae.decode` through the same `apply_forward_hook`.
    """
    return getattr(module, method)(*args)



def _prompt_list(prompt: str | list[str] | None) -> list[str]:
    """The prompts of a call, one per group of `num_samples_per_prompt` samples (`""`: unconditional)."""
    return [""] if prompt is None else [prompt] if isinstance(prompt, str) else prompt

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

    def check_inputs(
        self, prompt, num_samples_per_prompt, length, num_inference_steps, early_exit, generator, latents, output_type,
        callback_on_step_end_tensor_inputs,
    ):
        """Raise ValueError/TypeError on bad arguments, before any work."""
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
                raise TypeError(f"`prompt` must be a string, a list of strings or None, got {type(prompt).__name__}.")
            if isinstance(prompt, list) and not prompt:
                raise ValueError("`prompt` must be a non-empty list of strings, a string or None, got [].")
            if self.tokenizer is None:
                raise ValueError("`prompt` needs a tokenizer; the pipeline has none.")
        if not isinstance(num_samples_per_prompt, int) or num_samples_per_prompt < 1:
            raise ValueError(f"`num_samples_per_prompt` must be an integer >= 1, got {num_samples_per_prompt!r}.")
        max_length = self.model.config.max_position_embeddings
        if not isinstance(length, int) or not 1 <= length <= max_length:
            raise ValueError(f"`length` must be an integer in [1, {max_length}] (the model's max_position_embeddings), got {length!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if early_exit is not None and early_exit not in HALTING_CRITERIA:
            raise ValueError(f"`early_exit` must be one of {HALTING_CRITERIA} or None, got {early_exit!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        batch_size = len(_prompt_list(prompt)) * num_samples_per_prompt
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the batch has {batch_size} samples "
                "(prompts x `num_samples_per_prompt`); pass one generator per sample or a single one."
            )
        shape = (batch_size, length, self.model.config.embedding_dim)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape} (batch, length, embedding_dim), got {tuple(latents.shape)}.")
        # the time warp maps u to tau in the model's noise range; another range would misplace every step
        model_range = (self.model.config.sigma_min, self.model.config.sigma_max)
        scheduler_range = (self.scheduler.config.sigma_min, self.scheduler.config.sigma_max)
        if model_range != scheduler_range:
            raise ValueError(
                f"The scheduler's noise range (sigma_min, sigma_max)={scheduler_range} must equal the model's "
                f"{model_range}, the range its time warp was fitted on; build the scheduler with the model's values."
            )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
                )

    def _encode_prompts(self, prompt, length) -> list[list[int]]:
        """Token ids of each prompt, without special tokens, truncated to `length` as the tokenizer truncates."""
        encoded = []
        for text in _prompt_list(prompt):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(ids) > length:
                ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=length)["input_ids"]
                logger.warning(
                    f"`prompt` {text!r} is longer than `length`={length} tokens; it was truncated (on the tokenizer's "
                    f"`truncation_side`, {self.tokenizer.truncation_side!r}) to {self.tokenizer.decode(ids)!r}, "
                    "which leaves nothing to generate."
                )
            encoded.append(ids)
        return encoded

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_samples_per_prompt: int = 1,
        length: int | None = None,
        num_inference_steps: int = 200,
        early_exit: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DDLMPipelineOutput | tuple:
        r"""Sample `num_samples_per_prompt` sequences of `length` tokens per prompt (or unconditionally).

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Prefix(es) kept clean while the rest is generated; a prompt longer than `length` tokens is truncated
                as the tokenizer truncates (with a warning). Without one, samples are unconditional.
            num_samples_per_prompt (`int`, defaults to 1):
                Samples per prompt (without a prompt, the number of samples).
            length (`int`, *optional*):
                Tokens per sample, prompt included; at most, and by default, the model's `max_position_embeddings`
                (DDLM and CDCD: 64).
            num_inference_steps (`int`, defaults to 200):
                Euler steps (CDCD samples with 200), placed by the model's time warp.
            early_exit (`str`, *optional*):
                Halting criterion, one of `"entropy"`, `"switches"`, `"kl"` (thresholds in the scheduler's
                config), or None to run every step.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes the initial latents, hence the whole (deterministic) ODE solve, reproducible; a list gives
                one generator per sample (prompt-major order).
            latents (`torch.Tensor` of shape `(B, length, embedding_dim)`, *optional*):
                Standard normal noise to start from (scaled by the scheduler's `init_noise_sigma`, as diffusers
                pipelines scale theirs); drawn with `generator` when None. Prompt positions are replaced by the
                prompt's clean embeddings.
            output_type (`str`, defaults to `"text"`):
                `"text"`: token ids and, with a tokenizer, decoded texts; `"seq"`: token ids only; `"latent"`: the
                final latents instead of token ids.
            return_dict (`bool`, defaults to `True`):
                Return a [`DDLMPipelineOutput`] rather than its `to_tuple()`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`; a returned
                `"latents"` replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Keys of `callback_kwargs`, from `_callback_tensor_inputs` (defaults to `["latents"]`). `"logits"` is
                a buffer the next steps overwrite: clone it to keep it.

        Examples:

        Returns:
            [`DDLMPipelineOutput`] or its `to_tuple()`: `(sequences, steps_used[, texts])`, or
            `(latents, steps_used)` with `output_type="latent"`.
        """
        # 1. check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        length = self.model.config.max_position_embeddings if length is None else length
        self.check_inputs(
            prompt, num_samples_per_prompt, length, num_inference_steps, early_exit, generator, latents, output_type,
            callback_on_step_end_tensor_inputs,
        )
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 2. prompt prefix: token ids and a conditioning mask (True = clean), num_samples_per_prompt rows per prompt
        device = self._execution_device
        prompt_ids = self._encode_prompts(prompt, length)
        prompt_tokens, conditioning_mask = self._prepare_prefix(prompt_ids, num_samples_per_prompt, length, device)
        tokens, batch_size = prompt_tokens.clone(), prompt_tokens.shape[0]
        vocabulary = torch.arange(self.model.config.vocab_size, device=device)
        embeddings = _call_on_device(self.model, "embed", vocabulary)  # (V, d), E of CDCD
        clean = embeddings[prompt_tokens]  # (B, L, d)

        # 3. noise levels, placed by the model's learned time warp (CDCD, time warping)
        inverse_cdf = functools.partial(_call_on_device, self.model.time_warp, "inverse_cdf")
        self.scheduler.set_timesteps(num_inference_steps, device=device, inverse_cdf=inverse_cdf)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps

        # 4. initial latents x ~ N(0, sigma_max^2 I); the prompt prefix is clean
        latents = self._prepare_latents(latents, (batch_size, length, embeddings.shape[-1]), generator, device)
        latents = torch.where(conditioning_mask[..., None], clean, latents.to(embeddings.dtype))

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
                logits, next_latents, next_x0_hat = self._euler_step(
                    t, latents[active], x0_hat[active] if i > 0 else None, cond, clean[active], embeddings
                )  # logits (A, L, V)
                latents, x0_hat = latents.index_copy(0, active, next_latents), x0_hat.index_copy(0, active, next_x0_hat)
                tokens = tokens.index_copy(0, active, torch.where(cond, prompt_tokens[active], logits.argmax(-1)))
                steps_used = steps_used.index_add(0, active, torch.ones_like(active))

                if early_exit is not None:
                    halted, streak = self._update_halting(early_exit, i, logits, last_logits, active, ~cond, halted, streak)
                if last_logits is None:
                    last_logits = logits.new_zeros(batch_size, *logits.shape[1:])
                last_logits[active] = logits  # in place: a (B, L, V) copy per step would cost more than the rest

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

        # 6. outputs: token ids (and texts), or the latents
        self.maybe_free_model_hooks()
        if output_type == "latent":
            output = DDLMPipelineOutput(latents=latents, steps_used=steps_used)
        else:
            decode = output_type == "text" and self.tokenizer is not None
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True) if decode else None
            output = DDLMPipelineOutput(sequences=tokens, steps_used=steps_used, texts=texts)
        return output if return_dict else output.to_tuple()

    def _prepare_prefix(self, prompt_ids, num_samples_per_prompt, length, device):
        """`(B, L)` token ids (prompt, then padding) and `(B, L)` conditioning mask (True on the prompt)."""
        batch_size = len(prompt_ids) * num_samples_per_prompt
        tokens = torch.full((batch_size, length), self.model.config.pad_token_id or 0, dtype=torch.long, device=device)
        conditioning_mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        for row in range(batch_size):
            ids = prompt_ids[row // num_samples_per_prompt]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            conditioning_mask[row, : len(ids)] = True
        return tokens, conditioning_mask

    def _prepare_latents(self, latents, shape, generator, device):
        """`(B, L, d)` initial latents at sigma_max: the given or drawn standard normal noise times `init_noise_sigma`."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.model.dtype)
        return latents.to(device) * self.scheduler.init_noise_sigma

    def _euler_step(self, t, latents, self_conditioning, conditioning_mask, clean, embeddings):
        """Model call, score interpolation's x0_hat (CDCD) and one Euler step, for the active rows.

        Returns `(logits (A, L, V), latents at the next sigma (A, L, d), x0_hat (A, L, d))`.
        """
        sigma = t.expand(len(latents))
        logits = _call_on_device(self.model, "denoise", latents, sigma, self_conditioning, conditioning_mask)
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
