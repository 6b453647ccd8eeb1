"""Based / ReBased configuration.

Paper: "Linear Transformers with Learnable Kernel Functions are Better In-Context Models" (Aksenov et
al., 2024, https://arxiv.org/abs/2402.10644), which replaces the Taylor kernel of Based (Arora et al.,
2024, "Simple linear attention language models balance the recall-throughput tradeoff").
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

LAYER_TYPES = ("linear_attention", "sliding_attention", "conv")
FEATURE_MAPS = ("rebased", "taylor")
FEATURE_NORMS = ("joint", "per_head")


@strict
class BasedConfig(PreTrainedConfig):
    r"""
    Configuration of a [`BasedModel`] / [`BasedForCausalLM`]: a stack of pre-norm blocks, each a sequence
    mixer chosen by `layer_types` followed (optionally) by a SwiGLU MLP.

    The linear-attention mixer computes, per head (Eq. 1 of the ReBased paper),
    `y_i = sum_{j<=i} sim(q_i, k_j) v_j / (sum_{j<=i} sim(q_i, k_j) + eps)` with q, k projected to
    `feature_dim` per head and
    - `feature_map="rebased"` (Eq. 4): `q' = gamma_q * norm(q) + beta_q`, `k' = gamma_k * norm(k) + beta_k`,
      `sim = (q' . k')^2 / feature_dim` (Taylor's constant and linear terms dropped, learnable affine);
    - `feature_map="taylor"` (Based): `s = q . k / sqrt(feature_dim)`, `sim = 1 + s + s^2 / 2`.

    Args:
        vocab_size (`int`, defaults to 50277): size of the token vocabulary.
        hidden_size (`int`, defaults to 1024): width of the residual stream `d`.
        num_hidden_layers (`int`, defaults to 27): number of blocks.
        layer_types (`list[str]`, *optional*): the mixer of each block, one of `"linear_attention"`,
            `"sliding_attention"` (causal softmax attention over the last `sliding_window` tokens) and
            `"conv"` (gated short depthwise convolution, Based's BaseConv). Defaults to all
            `"linear_attention"`. Its length must equal `num_hidden_layers`.
        num_attention_heads (`int`, defaults to 16): heads of the linear- and sliding-window attention;
            `hidden_size` must be divisible by it (the value head size is `hidden_size // num_attention_heads`).
        num_key_value_heads (`int`, *optional*): key/value heads of the sliding-window attention (GQA);
            defaults to `num_attention_heads`.
        feature_map (`str`, defaults to `"rebased"`): `"rebased"` or `"taylor"` (Based), see above.
        feature_dim (`int`, defaults to 16): size of the per-head query/key projection fed to the kernel.
        feature_norm (`str`, defaults to `"joint"`): how ReBased normalises q and k before its affine.
            `"joint"` is the paper authors' code (corl-team/rebased): one LayerNorm over the whole
            `num_attention_heads * feature_dim` projection, with a `gamma`/`beta` per channel.
            `"per_head"` is flash-linear-attention's `RebasedFeatureMap`: a LayerNorm over each head's
            `feature_dim` features, with `gamma`/`beta` of size `feature_dim` shared by all heads.
            Ignored by `feature_map="taylor"`, which has no normalisation.
        linear_attention_eps (`float`, defaults to 1e-12): `eps` of the normaliser (the authors' value).
        chunk_size (`int`, defaults to 64): chunk length of the chunked linear-attention form used for
            training and prefill (memory linear in the sequence length).
        sliding_window (`int`, defaults to 128): tokens each query of a `"sliding_attention"` block sees,
            itself included (the transformers convention; Based-360m's flash-attn window `(w//2, 0)`
            corresponds to `sliding_window = w // 2 + 1`).
        conv_kernel_size (`int`, defaults to 3): kernel size of the causal depthwise convolution of
            `"conv"` blocks.
        conv_expand (`int`, defaults to 2): width of a `"conv"` block's gated branch, in multiples of
            `hidden_size`.
        use_mlp (`bool`, defaults to `True`): whether each block ends with a SwiGLU MLP (the MQAR model has
            none).
        intermediate_size (`int`, *optional*): MLP width; defaults to `2 * hidden_size` (Based-360m).
        hidden_act (`str`, defaults to `"silu"`): MLP activation.
        mlp_bias (`bool`, defaults to `False`): bias in the MLP projections.
        attention_bias (`bool`, defaults to `False`): bias in the sliding-window attention projections.
        attention_dropout (`float`, defaults to 0.0): dropout on the sliding-window attention weights.
        use_learned_positions (`bool`, defaults to `False`): add a learned absolute position embedding to the
            token embedding (the MQAR model of the paper); rotary embeddings are always used inside
            `"sliding_attention"` blocks.
        max_position_embeddings (`int`, defaults to 2048): size of the learned position table and the
            rotary cache.
        rope_parameters (`dict`, *optional*): rotary settings of the sliding-window attention (transformers
            `RopeParameters`, default `rope_theta` 10000).
        rms_norm_eps (`float`, defaults to 1e-5): epsilon of the RMSNorms.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of linear and
            embedding weights.
        use_cache (`bool`, defaults to `True`): whether `forward` returns the decoding state.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embedding.

    Examples:

    ```python
    >>> from hf_ext.models.based import BasedConfig
    >>> config = BasedConfig.mqar(hidden_size=64)
    >>> config.layer_types, config.use_mlp, config.feature_map
    (['conv', 'linear_attention'], False, 'rebased')
    >>> BasedConfig(feature_dim=0)
    Traceback (most recent call last):
    ...
    huggingface_hub.errors.StrictDataclassClassValidationError: Class validation error for validator 'validate_sizes':
        ValueError: `feature_dim` must be a positive integer, got 0.

    ```
    """

    model_type = "based"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 50277
    hidden_size: int = 1024
    num_hidden_layers: int = 27
    layer_types: list[str] | None = None
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    feature_map: str = "rebased"
    feature_dim: int = 16
    feature_norm: str = "joint"
    linear_attention_eps: float = 1e-12
    chunk_size: int = 64
    sliding_window: int = 128
    conv_kernel_size: int = 3
    conv_expand: int = 2
    use_mlp: bool = True
    intermediate_size: int | None = None
    hidden_act: str = "silu"
    mlp_bias: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_learned_positions: bool = False
    max_position_embeddings: int = 2048
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        super().__post_init__(**kwargs)

    def validate_sizes(self):
        """Part of `@strict` validation: positive sizes, and heads that divide the width."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "feature_dim",
                     "chunk_size", "conv_kernel_size", "conv_expand", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )

    def validate_mixers(self):
        """Part of `@strict` validation: known layer types and kernel options, a positive window. (transformers'
        own `validate_layer_type` checks that there is one layer type per layer.)"""
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"`layer_types` contains unknown types {unknown}; allowed: {list(LAYER_TYPES)}.")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"`feature_map` must be one of {list(FEATURE_MAPS)}, got {self.feature_map!r}.")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"`feature_norm` must be one of {list(FEATURE_NORMS)}, got {self.feature_norm!r}.")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
            raise ValueError(f"`sliding_window` must be a positive integer, got {self.sliding_window!r}.")
        if self.linear_attention_eps < 0:
            raise ValueError(f"`linear_attention_eps` must be >= 0, got {self.linear_attention_eps}.")

    @classmethod
    def mqar(cls, hidden_size: int = 128, feature_map: str = "rebased", vocab_size: int = 8192,
             max_position_embeddings: int = 2048, **kwargs) -> "BasedConfig":
        """The paper's MQAR model (App. B, corl-team/rebased `configs/`): 2 layers, a short convolution
        (kernel 3) then the linear-attention mixer, no MLP, learned positions, tied embeddings.

        The authors' sweep uses 12 heads for widths 64-512 with per-head feature size 16; heads here must
        divide `hidden_size`, so the default is `hidden_size // 16` heads (at least 1).
        """
        defaults = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, layer_types=["conv", "linear_attention"],
            num_attention_heads=max(1, hidden_size // 16), feature_map=feature_map, feature_dim=16, conv_kernel_size=3,
            conv_expand=1, use_mlp=False, use_learned_positions=True, max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
        )
        return cls(**{**defaults, **kwargs})

    @classmethod
    def based_360m(cls, **kwargs) -> "BasedConfig":
        """A Based-360m-like hybrid (HazyResearch `reference/based-360m.yaml`): 27 layers of width 1024,
        Taylor linear attention (16 heads, feature size 16) at layers 1, 6, 11, 16, 21, sliding-window
        attention at 2, 7, 12, 17, 22, gated short convolutions elsewhere, SwiGLU MLP (2d) in every block,
        RMSNorm and rotary embeddings. The window follows Based's look-back of `w // 2` with `w = 256`.
        Any field can be overridden (pass `num_hidden_layers` together with `layer_types`).
        """
        layer_types = ["conv"] * 27
        for i in (1, 6, 11, 16, 21):
            layer_types[i], layer_types[i + 1] = "linear_attention", "sliding_attention"
        defaults = dict(
            hidden_size=1024, num_hidden_layers=27, layer_types=layer_types, num_attention_heads=16,
            feature_map="taylor", feature_dim=16, sliding_window=129, conv_kernel_size=3, conv_expand=2,
            use_mlp=True, intermediate_size=2048, tie_word_embeddings=True,
        )
        return cls(**{**defaults, **kwargs})


__all__ = ["BasedConfig"]
