"""DDLM configuration.

DDLM ("Democratized Diffusion Language Model", Balagansky & Gavrilov, arXiv:2305.10818) is a
re-implementation of CDCD ("Continuous diffusion for categorical data", Dieleman et al.,
arXiv:2211.15089): a bidirectional transformer denoises L2-normalized token embeddings corrupted with
Gaussian noise of scale sigma, trained with cross-entropy on the clean tokens (score interpolation).
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class DDLMConfig(PreTrainedConfig):
    r"""Configuration of a [`DDLMModel`].

    Args:
        vocab_size (`int`, defaults to 32100):
            Number of tokens the model embeds and predicts.
        embedding_dim (`int`, defaults to 64):
            Size `d` of the diffusion space: token embeddings are L2-normalized and scaled by `sqrt(d)` (CDCD
            uses d = 256; DDLM's value is NOT VERIFIED).
        hidden_size (`int`, defaults to 768):
            Width of the transformer.
        num_hidden_layers (`int`, defaults to 12):
            Number of transformer blocks (CDCD: 8 blocks of width 1024).
        num_attention_heads (`int`, defaults to 12):
            Attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072):
            Width of the feed-forward layers.
        max_position_embeddings (`int`, defaults to 64):
            Longest sequence (DDLM and CDCD train on 64 tokens).
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout on the residual branches.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of weights.
        sigma_min (`float`, defaults to 1.0):
            Smallest training noise scale. DDLM lowers CDCD's range [1, 300] to [1, 10]; this is a third-party
            report and NOT VERIFIED against the paper.
        sigma_max (`float`, defaults to 10.0):
            Largest training noise scale (see `sigma_min`).
        time_warp_bins (`int`, defaults to 100):
            Number of pieces of the learned piecewise-linear CDF of the loss over noise levels (CDCD: 100).
        time_warp_loss_weight (`float`, defaults to 1.0):
            Weight of the squared error between the time-warp curve and the observed cross-entropy. Only the
            warp's parameters receive its gradient (the cross-entropy is detached).
        self_conditioning_rate (`float`, defaults to 0.5):
            Share of training batches that first predict x0 without gradient and then condition on it (CDCD's
            self-conditioning, after Chen et al. 2022 "Analog Bits"). In [0, 1].
        prefix_mask_rate (`float`, defaults to 0.25):
            Share of training sequences whose random-length prefix is kept clean (prompt conditioning).
        span_mask_rate (`float`, defaults to 0.25):
            Share of training sequences with random clean spans (infilling). CDCD trains on a mixture of
            unconditional, prefix and infilling masks; the rates here are our choice (NOT VERIFIED).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*):
            Special token ids, as in every transformers config.

    Example:

    ```python
    >>> from hf_ext import DDLMConfig, DDLMModel
    >>> config = DDLMConfig(vocab_size=100, embedding_dim=16, hidden_size=32, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=64)
    >>> model = DDLMModel(config)
    >>> model.config.sigma_max
    10.0

    ```
    """

    model_type = "ddlm"

    vocab_size: int = 32100
    embedding_dim: int = 64
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 64
    hidden_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    sigma_min: float = 1.0
    sigma_max: float = 10.0
    time_warp_bins: int = 100
    time_warp_loss_weight: float = 1.0
    self_conditioning_rate: float = 0.5
    prefix_mask_rate: float = 0.25
    span_mask_rate: float = 0.25
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the heads split the width evenly; the warp has pieces."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.time_warp_bins < 1:
            raise ValueError(f"`time_warp_bins` must be >= 1, got {self.time_warp_bins}.")

    def validate_noise_range(self):
        """Part of `@strict`-powered validation: noise scales are positive and ordered (CDCD: t in [t_min, t_max])."""
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"`sigma_min` must be > 0 and < `sigma_max`, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}."
            )

    def validate_rates(self):
        """Part of `@strict`-powered validation: rates are probabilities, and the two conditioning masks share one
        draw."""
        for name in ("self_conditioning_rate", "prefix_mask_rate", "span_mask_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        if self.prefix_mask_rate + self.span_mask_rate > 1.0:
            raise ValueError(
                "`prefix_mask_rate` + `span_mask_rate` must be <= 1, got "
                f"{self.prefix_mask_rate} + {self.span_mask_rate}."
            )


__all__ = ["DDLMConfig"]
