"""DDLM: a CDCD-style continuous diffusion language model.

"Democratized Diffusion Language Model" (Balagansky & Gavrilov, arXiv:2305.10818) re-implements CDCD
("Continuous diffusion for categorical data", Dieleman et al., arXiv:2211.15089). Sections cited below
are CDCD's unless marked otherwise; CDCD's parts are cited by name (its section numbers were not checked).

- Embeddings are learned, L2-normalized and scaled by sqrt(d). Noising is
  x_sigma = e + sigma * eps with eps ~ N(0, I), and the network sees c_in(sigma) * x_sigma
  with c_in = 1 / sqrt(sigma^2 + 1) (EDM preconditioning, Karras et al. 2022, sigma_data = 1).
- Score interpolation: the network predicts logits over the vocabulary; the denoised
  estimate is x0_hat = softmax(logits) @ E and the score is (x0_hat - x) / sigma^2. Training
  minimises the cross-entropy between the logits and the clean tokens.
- Time warping: a monotone piecewise-linear function F(sigma), fitted to the cross-entropy
  observed at sigma, is normalised into a CDF; training draws sigma = F^-1(u) with u low-discrepancy
  uniform, and sampling places its steps at F^-1 of evenly spaced u.
- Self-conditioning (after Chen et al. 2022, "Analog Bits"): on a random half of the training batches the
  model first predicts x0 without gradient and then conditions on that estimate.
- Conditioning: positions under a conditioning mask (a prompt prefix or clean spans) hold
  their clean embeddings and are excluded from the loss.

Choices of ours, where neither paper was checked or where we simplify (a checkpoint trained elsewhere will not
load into these modules): positions are learned absolute embeddings (CDCD uses rotary ones); the noise level
enters once, as an embedding added to the input (not per block); a learned two-entry embedding marks the clean
positions; the default noise range [1, 10] is DDLM's lower range as reported by a third party (CDCD: [1, 300]).

This file imports only torch, transformers and its own folder, so a saved model loads as remote code.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_ddlm import DDLMConfig

# ---------------------------------------------------------------------------------------------------
# Pure functions: the equations, each in one place.
# ---------------------------------------------------------------------------------------------------


def normalize_embeddings(weight: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalized and scaled by sqrt(d), so each has norm sqrt(d) (CDCD, embeddings)."""
    return F.normalize(weight, dim=-1) * math.sqrt(weight.shape[-1])


def input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c_in(sigma) = 1 / sqrt(sigma^2 + 1): the noisy input's scale brought back to about 1 (EDM, sigma_data = 1)."""
    return torch.rsqrt(sigma**2 + 1)


def interpolate_embeddings(logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Score interpolation's x0_hat = softmax(logits) @ E (CDCD, score interpolation), in float32 for low-precision runs.

    Args:
        logits: `(B, T, V)` predicted token logits.
        embeddings: `(V, d)` normalized embedding matrix.

    Returns:
        `(B, T, d)` expected clean embedding, in the dtype of `embeddings`.
    """
    probs = logits.float().softmax(dim=-1)
    return (probs @ embeddings.float()).to(embeddings.dtype)


def low_discrepancy_uniform(batch_size: int, device: torch.device) -> torch.Tensor:
    """u_i = (i + u0) / B for one u0 ~ U[0, 1): a stratified batch of uniforms (CDCD, time warping, after VDM)."""
    return (torch.arange(batch_size, device=device) + torch.rand((), device=device)) / batch_size


def draw_conditioning_mask(
    batch_size: int, seq_len: int, prefix_rate: float, span_rate: float, device: torch.device
) -> torch.Tensor:
    """A training conditioning mask (True = clean position), as CDCD's mixture of conditioning tasks.

    Each row is, independently, a random-length prefix (with probability `prefix_rate`), one random
    clean span (`span_rate`), or fully noisy (the rest). At least one position of a row stays noisy.

    Returns:
        `(B, T)` bool tensor.
    """
    positions = torch.arange(seq_len, device=device)  # (T,)
    kind = torch.rand(batch_size, device=device)  # (B,)
    # a prefix of length 1..T-1
    prefix_len = torch.randint(1, max(seq_len, 2), (batch_size, 1), device=device).clamp(max=seq_len - 1)
    prefix = positions < prefix_len
    # one span of length 1..T//2 starting anywhere, cut at the end of the sequence
    span_len = torch.randint(1, max(seq_len // 2, 1) + 1, (batch_size, 1), device=device)
    span_start = torch.randint(0, seq_len, (batch_size, 1), device=device)
    span = (positions >= span_start) & (positions < span_start + span_len)
    span &= span.sum(-1, keepdim=True) < seq_len
    mask = torch.where((kind < prefix_rate)[:, None], prefix, torch.zeros_like(prefix))
    return torch.where(((kind >= prefix_rate) & (kind < prefix_rate + span_rate))[:, None], span, mask)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class DDLMTimeWarp(nn.Module):
    """Learned monotone piecewise-linear CDF over the noise level (CDCD, "time warping").

    Time is normalised, tau = (sigma - sigma_min) / (sigma_max - sigma_min) in [0, 1], and cut into
    `num_bins` equal pieces. The CDF rises by softmax(`logits`) over the pieces, so it is strictly
    increasing, starts at 0 and ends at 1; with zero logits it is the identity (uniform tau).
    The unnormalised curve `bias + exp(log_scale) * cdf(tau)` is fitted to the cross-entropy seen at
    tau; its shape is what sets the CDF, so noise levels are drawn where the loss changes most.
    """

    def __init__(self, num_bins: int):
        super().__init__()
        self.num_bins = num_bins
        self.logits = nn.Parameter(torch.zeros(num_bins))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def knots(self) -> torch.Tensor:
        """`(num_bins + 1,)` CDF values at tau = 0, 1/n, ..., 1 (first exactly 0, last exactly 1)."""
        heights = torch.cumsum(self.logits.float().softmax(-1), dim=0)
        heights = heights / heights[-1]  # exact 1 at the end despite rounding
        return torch.cat([heights.new_zeros(1), heights])

    def cdf(self, tau: torch.Tensor) -> torch.Tensor:
        """F(tau): linear interpolation between the knots; tau is clamped to [0, 1]."""
        knots = self.knots()
        position = tau.float().clamp(0, 1) * self.num_bins
        index = position.floor().clamp(max=self.num_bins - 1).long()
        frac = position - index
        return knots[index] + frac * (knots[index + 1] - knots[index])

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """F^-1(u) in tau units: the piece holding u, then linear interpolation inside it."""
        knots = self.knots().detach()
        u = u.float().clamp(0, 1).to(knots.device)  # the scheduler passes CPU u to a warp that may sit on a GPU
        index = (torch.searchsorted(knots, u, right=True) - 1).clamp(0, self.num_bins - 1)
        frac = (u - knots[index]) / (knots[index + 1] - knots[index])
        return ((index + frac) / self.num_bins).clamp(0, 1)

    def predicted_loss(self, tau: torch.Tensor) -> torch.Tensor:
        """The unnormalised curve bias + exp(log_scale) * F(tau), fitted to the cross-entropy at tau."""
        return self.bias + self.log_scale.exp() * self.cdf(tau)


class DDLMTimeEmbedding(nn.Module):
    """Sinusoidal features of c_noise = ln(sigma) / 4 (EDM) through a two-layer MLP, one vector per sequence."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.hidden_size // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=sigma.device) / half)  # (h/2,)
        angles = (sigma.float().log() / 4)[:, None] * frequencies * 1000  # (B, h/2); x1000 spreads ln(sigma)/4 in [0, 1.5]
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        features = F.pad(features, (0, self.hidden_size - features.shape[-1]))  # odd widths
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, h)


class DDLMAttention(nn.Module):
    """Bidirectional multi-head self-attention (no causal mask: every position sees every other).

    The attention itself runs through transformers' attention interface, so `attn_implementation="sdpa"` (the
    default) and `"eager"` (the plain softmax(QK^T / sqrt(d_head)) V, which also returns the weights) compute the same
    function; the mask comes from `transformers.masking_utils.create_bidirectional_mask`.
    """

    def __init__(self, config: DDLMConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by the attention interface (SDPA's `is_causal`)
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, T, h)` -> (`(B, T, h)` output, `(B, nh, T, T)` weights or None where the implementation has none)."""
        B, T, C = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, nh, T, hs)
        # `_attn_implementation` is how every in-tree model dispatches (see transformers' AttentionInterface docs)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )  # (B, T, nh, hs)
        return self.o_proj(out.reshape(B, T, C)), weights


class DDLMBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: attention then MLP, each on a residual branch. Checkpointed as a whole when
    activation checkpointing is on (`model.activation_checkpointing_enable()`)."""

    def __init__(self, config: DDLMConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = DDLMAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        attn_out, _ = self.attn(self.attn_norm(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_out)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class DDLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the `from_pretrained`/`save_pretrained` plumbing shared by DDLM models."""

    config: DDLMConfig
    base_model_prefix = "ddlm"
    _no_split_modules = ["DDLMBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # `output_hidden_states` / `output_attentions` are collected by hooks on these modules (`@capture_outputs`)
    _can_record_outputs = {"hidden_states": DDLMBlock, "attentions": DDLMAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DDLMTimeWarp):
            # zero logits: the warp starts as the identity (noise levels drawn uniformly). The curve starts
            # as a line from 0 (clean) to ln(V) (a uniform guess at full noise), the range the loss spans
            # once trained, so the shape rather than the offset is what the fit adjusts.
            init.zeros_(module.logits)
            init.constant_(module.log_scale, math.log(math.log(self.config.vocab_size)))
            init.zeros_(module.bias)


@dataclass
class DDLMModelOutput(ModelOutput):
    """Output of [`DDLMModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
            Cross-entropy on the noisy positions plus `time_warp_loss_weight * time_warp_loss`.
        logits (`torch.FloatTensor` of shape `(B, T, V)`):
            Predicted clean-token logits.
        x0_hat (`torch.FloatTensor` of shape `(B, T, d)`):
            Score interpolation's estimate softmax(logits) @ E of the clean embeddings, without gradient (the loss is
            on `logits`; a next pass takes it as `self_conditioning`). A differentiable one is
            `interpolate_embeddings(out.logits, model.embedding_matrix())`.
        sigma (`torch.FloatTensor` of shape `(B,)`):
            Noise level of each sequence.
        conditioning_mask (`torch.BoolTensor` of shape `(B, T)`):
            Positions that were kept clean.
        time_warp_loss (`torch.FloatTensor` of shape `()`, returned when `labels` is given):
            Squared error between the time-warp curve and the per-sequence cross-entropy.
        hidden_states (`tuple(torch.FloatTensor)`, returned when `output_hidden_states=True`):
            `num_hidden_layers + 1` tensors of shape `(B, T, hidden_size)` from the denoising pass that gave
            `logits`: the input of the first block, then the output of each block, the last one after the final
            layer norm (as in transformers' models).
        attentions (`tuple(torch.FloatTensor)`, returned when `output_attentions=True` with eager attention):
            `num_hidden_layers` tensors of shape `(B, num_attention_heads, T, T)`, the attention weights after the
            softmax.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    x0_hat: torch.FloatTensor | None = None
    sigma: torch.FloatTensor | None = None
    conditioning_mask: torch.BoolTensor | None = None
    time_warp_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DDLMModel(DDLMPreTrainedModel):
    """The DDLM denoiser: noisy embeddings, noise level and self-conditioning in, clean-token logits out.

    `model(input_ids, labels=input_ids)` noises the clean tokens itself (noise level from the time
    warp, conditioning mask and self-conditioning drawn as in training) and returns the training loss,
    so `transformers.Trainer` trains it. Sampling calls [`~DDLMModel.denoise`] on its own latents;
    see `hf_ext.DDLMPipeline`.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext import DDLMConfig, DDLMModel
    >>> config = DDLMConfig(vocab_size=100, embedding_dim=16, hidden_size=32, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=64)
    >>> model = DDLMModel(config)
    >>> input_ids = torch.randint(0, 100, (2, 8))
    >>> out = model(input_ids, labels=input_ids)
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([2, 8, 100]), 0)

    ```
    """

    # The loss is a mean over tokens plus the time-warp fit over sequences: `Trainer` must not pass
    # `num_items_in_batch` (which `**kwargs` would otherwise invite) and must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: DDLMConfig):
        super().__init__(config)
        d, h = config.embedding_dim, config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        # noisy input and self-conditioning estimate, concatenated (CDCD, self-conditioning)
        self.input_proj = nn.Linear(2 * d, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        # tells the network which positions are clean conditioning (CDCD, conditioning)
        self.conditioning_embeddings = nn.Embedding(2, h)
        self.time_embedding = DDLMTimeEmbedding(h)
        self.layers = nn.ModuleList(DDLMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(h, config.vocab_size)
        self.time_warp = DDLMTimeWarp(config.time_warp_bins)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def embedding_matrix(self) -> torch.Tensor:
        """`(V, d)` the normalized embeddings E that tokens diffuse from (CDCD, embeddings)."""
        return normalize_embeddings(self.embed_tokens.weight)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`(B, T, d)` clean normalized embeddings of `input_ids`."""
        return normalize_embeddings(self.embed_tokens(input_ids))

    def sigma_to_tau(self, sigma: torch.Tensor) -> torch.Tensor:
        """Normalised time tau = (sigma - sigma_min) / (sigma_max - sigma_min)."""
        return (sigma - self.config.sigma_min) / (self.config.sigma_max - self.config.sigma_min)

    def sample_sigma(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """`(B,)` training noise levels sigma = F^-1(u), u low-discrepancy uniform (CDCD, time warping)."""
        tau = self.time_warp.inverse_cdf(low_discrepancy_uniform(batch_size, device))
        return self.config.sigma_min + tau * (self.config.sigma_max - self.config.sigma_min)

    @capture_outputs
    def denoise_outputs(
        self,
        noisy_embeds: torch.Tensor,
        sigma: torch.Tensor,
        self_conditioning: torch.Tensor | None = None,
        conditioning_mask: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """One evaluation of the transformer, up to (not including) the vocabulary head.

        Args:
            noisy_embeds: `(B, T, d)` x_sigma (clean embeddings at conditioning positions).
            sigma: `(B,)` noise levels.
            self_conditioning: `(B, T, d)` previous x0 estimate, or None for zeros.
            conditioning_mask: `(B, T)` True at clean positions, or None for none.
            attention_mask: `(B, T)` 1 for real tokens, 0 for padding, or None for all real.
            output_hidden_states, output_attentions (`bool`, *optional*): collect the blocks' outputs / attention
                weights (defaults from the config), as in transformers' models.

        Returns:
            `BaseModelOutput` with `last_hidden_state` `(B, T, hidden_size)` after the final layer norm, and
            `hidden_states` / `attentions` when asked.
        """
        B, T, _ = noisy_embeds.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {T} exceeds `max_position_embeddings`={self.config.max_position_embeddings}."
            )
        if self_conditioning is None:
            self_conditioning = torch.zeros_like(noisy_embeds)
        if conditioning_mask is None:
            conditioning_mask = torch.zeros(B, T, dtype=torch.bool, device=noisy_embeds.device)
        scaled = noisy_embeds * input_scale(sigma).to(noisy_embeds.dtype)[:, None, None]
        positions = torch.arange(T, device=noisy_embeds.device)
        hidden = (
            self.input_proj(torch.cat([scaled, self_conditioning], dim=-1))
            + self.position_embeddings(positions)
            + self.conditioning_embeddings(conditioning_mask.long())
            + self.time_embedding(sigma)[:, None, :]
        )  # (B, T, h)
        # (B, 1, T, T) padding mask in the form the attention implementation wants (None when nothing is masked)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))

    def denoise(
        self,
        noisy_embeds: torch.Tensor,
        sigma: torch.Tensor,
        self_conditioning: torch.Tensor | None = None,
        conditioning_mask: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One network evaluation: the `(B, T, V)` logits of [`~DDLMModel.denoise_outputs`] (same arguments)."""
        outputs = self.denoise_outputs(
            noisy_embeds, sigma, self_conditioning, conditioning_mask, attention_mask,
            output_hidden_states=False, output_attentions=False, return_dict=True,
        )
        return self.lm_head(outputs.last_hidden_state)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        sigma: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        conditioning_mask: torch.BoolTensor | None = None,
        self_conditioning: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DDLMModelOutput:
        """Noise clean tokens, denoise them and, with `labels`, return the training loss.

        Args:
            input_ids: `(B, T)` clean tokens.
            attention_mask: `(B, T)` 1 for real tokens, 0 for padding.
            labels: `(B, T)` targets (usually `input_ids`); -100 is ignored.
            sigma: noise level(s), a float or `(B,)`; drawn from the time warp when None.
            noise: `(B, T, d)` standard normal noise; drawn when None.
            conditioning_mask: `(B, T)` True where the clean embedding is kept; drawn in training
                (prefix / span / none, see the config), all False in eval, when None.
            self_conditioning: `(B, T, d)` previous x0 estimate. When None in training, a random share
                `self_conditioning_rate` of batches computes it with a first, gradient-free pass.
            output_hidden_states, output_attentions (`bool`, *optional*): return the hidden states / attention
                weights of the pass that gives `logits` (the self-conditioning pass is not recorded); attention
                weights need `attn_implementation="eager"`.
            return_dict (`bool`, *optional*): return a [`DDLMModelOutput`] (default: `config.return_dict`) or a tuple.

        Returns:
            [`DDLMModelOutput`].
        """
        if input_ids is None:
            raise ValueError("`input_ids` must be given (the clean tokens to noise).")
        B, T = input_ids.shape
        device = input_ids.device
        # 1. noise level, conditioning mask and noisy input x = e + sigma * eps (CDCD)
        if sigma is None:
            sigma = self.sample_sigma(B, device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(B)
        if conditioning_mask is None:
            if self.training:
                conditioning_mask = draw_conditioning_mask(
                    B, T, self.config.prefix_mask_rate, self.config.span_mask_rate, device
                )
            else:
                conditioning_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        clean = self.embed(input_ids)  # (B, T, d)
        if noise is None:
            noise = torch.randn_like(clean)
        noisy = torch.where(conditioning_mask[..., None], clean, clean + sigma.to(clean.dtype)[:, None, None] * noise)

        # 2. self-conditioning: a first pass without gradient on a random share of batches (CDCD, self-conditioning)
        with torch.no_grad():  # E for the x0_hat estimates, which carry no gradient
            embeddings = self.embedding_matrix()
        if self_conditioning is None and self.training and torch.rand(()) < self.config.self_conditioning_rate:
            with torch.no_grad():
                first = self.denoise(noisy, sigma, None, conditioning_mask, attention_mask)
                self_conditioning = interpolate_embeddings(first, embeddings)

        # 3. logits and score interpolation's x0_hat (CDCD, score interpolation). The loss reads only the logits: an
        # x0_hat with gradient would keep its (B, T, V) softmax alive for backward as long as the output is.
        outputs = self.denoise_outputs(
            noisy, sigma, self_conditioning, conditioning_mask, attention_mask, return_dict=True, **kwargs
        )
        logits = self.lm_head(outputs.last_hidden_state)
        x0_hat = interpolate_embeddings(logits.detach(), embeddings)

        # 4. loss: cross-entropy on the noisy positions, plus the time-warp fit
        loss = time_warp_loss = None
        if labels is not None:
            loss, time_warp_loss = self._loss(logits, labels, sigma, conditioning_mask, attention_mask)

        return DDLMModelOutput(
            loss=loss, logits=logits, x0_hat=x0_hat, sigma=sigma, conditioning_mask=conditioning_mask,
            time_warp_loss=time_warp_loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    def _loss(self, logits, labels, sigma, conditioning_mask, attention_mask):
        """Mean CE over scored positions + weight * mean over sequences of (F~(tau) - CE_seq)^2 (CDCD, time warping)."""
        scored = (labels != -100) & ~conditioning_mask  # (B, T)
        if attention_mask is not None:
            scored &= attention_mask.bool()
        token_ce = F.cross_entropy(
            logits.float().transpose(1, 2), labels.masked_fill(~scored, 0), reduction="none"
        ) * scored  # (B, T)
        ce = token_ce.sum() / scored.sum().clamp(min=1)
        # the warp sees each sequence's CE at its own noise level; the CE is detached so only the warp learns here
        counts = scored.sum(-1)
        has_scored = counts > 0
        sequence_ce = (token_ce.sum(-1) / counts.clamp(min=1)).detach()
        predicted = self.time_warp.predicted_loss(self.sigma_to_tau(sigma))
        time_warp_loss = ((predicted - sequence_ce) ** 2 * has_scored).sum() / has_scored.sum().clamp(min=1)
        return ce + self.config.time_warp_loss_weight * time_warp_loss, time_warp_loss


__all__ = [
    "DDLMModel",
    "DDLMModelOutput",
    "DDLMPreTrainedModel",
    "DDLMTimeWarp",
    "draw_conditioning_mask",
    "input_scale",
    "interpolate_embeddings",
    "low_discrepancy_uniform",
    "normalize_embeddings",
]
