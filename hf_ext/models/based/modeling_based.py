"""Based / ReBased causal language model.

Paper: "Linear Transformers with Learnable Kernel Functions are Better In-Context Models" (Aksenov et
al., 2024, https://arxiv.org/abs/2402.10644). Linear attention computes, per head,

    y_i = sum_{j<=i} sim(q_i, k_j) v_j / (sum_{j<=i} sim(q_i, k_j) + eps)                       (Eq. 1)

with `sim(q, k) = phi(q) . phi(k)` for a feature map `phi`, so that it can run as a recurrence over a
state of fixed size, `S_i = S_{i-1} + phi(k_i)^T [v_i, 1]`, `[num, den] = phi(q_i) S_i` (Eq. 2). ReBased
uses `sim = (q' . k')^2 / d` with `q' = gamma * norm(q) + beta` (Eq. 4); Based uses the Taylor kernel
`1 + s + s^2 / 2`, `s = q . k / sqrt(d)`.

The three forms of linear attention below compute the same function (tested to 1e-4 in float32):
`linear_attention_parallel` (quadratic, the reference), `linear_attention_chunked` (training and
prefill; memory linear in T) and `linear_attention_recurrent` (decoding). They share fla's layout
`[B, T, H, D]` and return `(output, final_state)` where a state is `[B, H, D_phi, D_v + 1]`: the
key-value sum with the normaliser `z = sum phi(k)` as its last column.

On CUDA, when flash-linear-attention is installed, the mixer runs the same two forms on fla's Triton kernels
(`fla_linear_attention_chunked`, `fla_linear_attention_recurrent`); CPU always uses the torch forms.

This folder imports only torch, transformers and packaging (which transformers requires); fla only on first CUDA
use, inside `try`. So a saved model loads with `trust_remote_code=True`.
"""

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from packaging import version
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_recurrent_attention_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_based import BasedConfig

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Linear attention: kernels and the three forms


def _scale_features(x: torch.Tensor) -> torch.Tensor:
    # d^(-1/4) on both q and k puts the kernel's 1/sqrt(d) scaling (ReBased: 1/d after squaring) into the features.
    return x * x.shape[-1] ** -0.25


def kernel_similarity(q: torch.Tensor, k: torch.Tensor, feature_map: str) -> torch.Tensor:
    """`sim(q_i, k_j)` for all pairs: `[..., Tq, F] x [..., Tk, F] -> [..., Tq, Tk]`.

    `"rebased"`: `s^2` and `"taylor"`: `1 + s + s^2 / 2`, with `s = q . k / sqrt(F)`.
    """
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return s * s if feature_map == "rebased" else 1 + s + 0.5 * s * s


def expand_features(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """The feature map `phi` with `phi(q) . phi(k) = kernel_similarity(q, k)`: `[..., F] -> [..., D_phi]`.

    `"rebased"`: `vec(x x^T) / sqrt(F)` (`D_phi = F^2`); `"taylor"`: `[1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]`
    (`D_phi = 1 + F + F^2`, the HazyResearch layout).
    """
    x = _scale_features(x)
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # [..., F*F]
    if feature_map == "rebased":
        return outer
    return torch.cat([torch.ones_like(x[..., :1]), x, outer * 0.5**0.5], dim=-1)


def _values_with_normaliser(v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    # [v, 1]: the extra column accumulates the normaliser. Masked keys (padding) get [0, 0] and contribute nothing.
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, H, Dv+1]
    if key_mask is not None:
        v1 = v1 * key_mask[:, :, None, None].to(v1.dtype)
    return v1


def _normalise(out: torch.Tensor, eps: float) -> torch.Tensor:
    return out[..., :-1] / (out[..., -1:] + eps)


def linear_attention_parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, *, eps: float = 1e-12,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quadratic reference form of Eq. 1 (float32 inside). Returns no state.

    Args:
        q, k: `[B, T, H, F]` queries and keys (after ReBased's normalisation, if any).
        v: `[B, T, H, Dv]` values.
        feature_map: `"rebased"` or `"taylor"`.
        eps: added to the normaliser.
        key_mask: optional `[B, T]`, 0 for positions (padding) that must not be attended to.

    Returns:
        `[B, T, H, Dv]` in the dtype of `v`.
    """
    B, T, H, _ = q.shape
    q, k, v1 = q.float().transpose(1, 2), k.float().transpose(1, 2), _values_with_normaliser(v.float(), key_mask).transpose(1, 2)
    sim = kernel_similarity(q, k, feature_map)  # [B, H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    out = (sim * causal) @ v1  # [B, H, T, Dv+1]
    return _normalise(out, eps).transpose(1, 2).to(v.dtype)


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, *, eps: float = 1e-12, chunk_size: int = 64,
    initial_state: torch.Tensor | None = None, key_mask: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form of Eq. 1: quadratic inside chunks of `chunk_size`, the state of Eq. 2 between them.

    Memory is `O(T * chunk_size + (T / chunk_size) * D_phi * Dv)`, linear in T. Arguments as
    :func:`linear_attention_parallel`, plus `initial_state` `[B, H, D_phi, Dv+1]` (e.g. from an earlier prefix)
    and `output_final_state` (training needs none; the state path is skipped when a single chunk from an
    empty state needs no state).

    Returns:
        The output `[B, T, H, Dv]` and the final state `[B, H, D_phi, Dv+1]` (float32), or None when
        `output_final_state` is False.
    """
    B, T, H, _ = q.shape
    C = chunk_size
    N = -(-T // C)  # number of chunks
    pad = N * C - T
    v1 = _values_with_normaliser(v.float(), key_mask)
    # Zero padding at the end: padded keys carry [0, 0] values, padded queries are dropped below.
    q, k, v1 = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2).reshape(B, H, N, C, -1) for x in (q, k, v1))
    # 1. Within each chunk: the quadratic form.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    out = (kernel_similarity(q, k, feature_map) * causal) @ v1  # [B, H, N, C, Dv+1]
    final_state = None
    if N > 1 or initial_state is not None or output_final_state:
        # 2. Across chunks: the state each chunk starts from (exclusive prefix sum of per-chunk states).
        phi_q, phi_k = expand_features(q, feature_map), expand_features(k, feature_map)  # [B, H, N, C, D_phi]
        chunk_states = phi_k.transpose(-1, -2) @ v1  # [B, H, N, D_phi, Dv+1]
        if initial_state is None:
            initial_state = torch.zeros_like(chunk_states[:, :, 0])
        starts = torch.cat([initial_state.float().unsqueeze(2), chunk_states[:, :, :-1]], dim=2).cumsum(dim=2)
        out = out + phi_q @ starts  # [B, H, N, C, Dv+1]
        if output_final_state:
            final_state = starts[:, :, -1] + chunk_states[:, :, -1]
    # 3. Normalise and drop the padded positions.
    out = _normalise(out, eps).reshape(B, H, N * C, -1)[:, :, :T]
    return out.transpose(1, 2).to(v.dtype), final_state


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, *, eps: float = 1e-12,
    initial_state: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form (Eq. 2), one token at a time: `S_t = S_{t-1} + phi(k_t)^T [v_t, 1]`, `y_t = phi(q_t) S_t`.

    The state has a fixed size `[B, H, D_phi, Dv+1]` whatever the context length. Arguments and returns as
    :func:`linear_attention_chunked`.
    """
    v1 = _values_with_normaliser(v.float(), key_mask)  # [B, T, H, Dv+1]
    phi_q, phi_k = expand_features(q.float(), feature_map), expand_features(k.float(), feature_map)  # [B, T, H, D_phi]
    state = initial_state.float() if initial_state is not None else phi_k.new_zeros(*phi_k.shape[:1], *phi_k.shape[2:], v1.shape[-1])
    outputs = []
    for t in range(q.shape[1]):
        state = state + phi_k[:, t, :, :, None] * v1[:, t, :, None, :]  # [B, H, D_phi, Dv+1]
        outputs.append(_normalise(torch.einsum("bhf,bhfv->bhv", phi_q[:, t], state), eps))
    return torch.stack(outputs, dim=1).to(v.dtype), state


# ----------------------------------------------------------------------------------------------------------------------
# Optional flash-linear-attention kernels (CUDA only)
#
# fla's Triton kernels compute the same two forms. transformers' `use_kernel_func_from_hub_with_fallback` would
# import fla with this module and call it on any device once installed; here fla is imported on the first CUDA
# tensor and never otherwise, so CPU runs never import it, and `trust_remote_code` loading (which ignores imports
# inside `try`) does not require it.


# The oldest fla release checked to have these ops' `[B, T, H, D]` default layout and `normalize` / `use_norm` /
# `use_normalize` arguments (0.3.2, 0.4.0 and 0.6.0 were read).
_FLA_MIN_VERSION = "0.3.2"


@functools.cache
def _fla_ops() -> SimpleNamespace | None:
    """fla's kernels, or None when flash-linear-attention (the `fla` package of `fla-core`) is not importable or
    older than `_FLA_MIN_VERSION`."""
    try:
        import fla
        from fla.ops.based import parallel_based
        from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
        from fla.ops.rebased import parallel_rebased
    except ImportError:
        return None
    if version.parse(fla.__version__) < version.parse(_FLA_MIN_VERSION):
        logger.warning_once(
            f"flash-linear-attention {fla.__version__} is older than {_FLA_MIN_VERSION}; Based uses its torch forms."
        )
        return None
    return SimpleNamespace(
        parallel={"taylor": functools.partial(parallel_based, use_norm=False),
                  "rebased": functools.partial(parallel_rebased, use_normalize=False)},
        chunk=chunk_linear_attn, recurrent=fused_recurrent_linear_attn,
    )


def uses_fla(x: torch.Tensor) -> bool:
    """Whether the mixer runs fla's kernels on `x`: on CUDA tensors, when fla is installed."""
    return x.is_cuda and _fla_ops() is not None


def fla_linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, *, eps: float = 1e-12,
    initial_state: torch.Tensor | None = None, key_mask: torch.Tensor | None = None, output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`linear_attention_chunked` on fla's kernels (fla picks its own chunk size); same arguments and returns.

    Without a state in or out (training), fla's `parallel_based` / `parallel_rebased` kernels take the `F`-wide q
    and k and never materialise `phi`. With a state (prefill), `chunk_linear_attn` runs on `phi(q)`, `phi(k)`, whose
    `[B, H, D_phi, Dv+1]` state is this module's. Both get the values as `[v, 1]`, as the torch forms do, so that
    the normaliser, padding and `eps` are handled here, identically on both paths (our choice: one value column more
    than fla's own normalisation, in exchange for exact padding with either kernel). Inputs are upcast to float32 as
    in the torch path; on GPUs with TF32, Triton's float32 matmuls round their inputs to TF32.
    """
    ops = _fla_ops()
    v1 = _values_with_normaliser(v.float(), key_mask)
    if initial_state is None and not output_final_state and q.shape[-1] <= 128:  # fla's parallel kernels' limit
        out, final_state = ops.parallel[feature_map](q.float(), k.float(), v1), None
    else:
        phi_q, phi_k = expand_features(q.float(), feature_map), expand_features(k.float(), feature_map)
        out, final_state = ops.chunk(
            phi_q, phi_k, v1, scale=1.0, initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=output_final_state, normalize=False,
        )
    return _normalise(out, eps).to(v.dtype), final_state


def fla_linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, *, eps: float = 1e-12,
    initial_state: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_attention_recurrent` on fla's `fused_recurrent_linear_attn`; same arguments and returns."""
    phi_q, phi_k = expand_features(q.float(), feature_map), expand_features(k.float(), feature_map)
    out, state = _fla_ops().recurrent(
        phi_q, phi_k, _values_with_normaliser(v.float(), key_mask), scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
        normalize=False,
    )
    return _normalise(out, eps).to(v.dtype), state


# ----------------------------------------------------------------------------------------------------------------------
# Mixers


def _count_tokens_in_cache(cache: Cache, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Advance the token count of a layer whose cache holds only a recurrent state, and mark that state as present.

    In transformers 5.25 a linear-attention cache layer does both only in `update_conv_state`
    (`update_recurrent_state` does neither); without them `get_seq_length()` stays 0, so default positions and
    `generate(cache=...)` restart at token 0, and `get_recurrent_state` keeps returning None. This mixer has no
    convolution, so it passes a zero-width conv state `[B, 0, T]` through that public call: it counts the `T` new
    tokens and stores nothing.
    """
    B, T, _ = hidden_states.shape
    cache.update_conv_state(hidden_states.new_empty(B, 0, T), layer_idx, conv_kernel_size=1)


class BasedLinearAttention(nn.Module):
    """Based / ReBased linear attention (Eq. 1), with its recurrent state in the transformers `Cache`.

    q and k are projected to `feature_dim` per head; for ReBased they go through a LayerNorm whose affine is the
    learnable `gamma`, `beta` of Eq. 4 (`ln_q.weight`, `ln_q.bias`, ...), jointly over all heads or per head
    (`config.feature_norm`).
    """

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.feature_dim = config.feature_dim
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.feature_map = config.feature_map
        self.feature_norm = config.feature_norm
        self.eps = config.linear_attention_eps
        self.chunk_size = config.chunk_size
        qk_size = self.num_heads * self.feature_dim
        self.proj_q = nn.Linear(config.hidden_size, qk_size, bias=False)
        self.proj_k = nn.Linear(config.hidden_size, qk_size, bias=False)
        self.proj_v = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.proj_o = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if self.feature_map == "rebased":
            norm_size = qk_size if self.feature_norm == "joint" else self.feature_dim
            self.ln_q = nn.LayerNorm(norm_size)
            self.ln_k = nn.LayerNorm(norm_size)

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = hidden_states.shape
        q, k = self.proj_q(hidden_states), self.proj_k(hidden_states)  # [B, T, H*F]
        if self.feature_map == "rebased" and self.feature_norm == "joint":
            q, k = self.ln_q(q), self.ln_k(k)
        q, k = q.view(B, T, self.num_heads, self.feature_dim), k.view(B, T, self.num_heads, self.feature_dim)
        if self.feature_map == "rebased" and self.feature_norm == "per_head":
            q, k = self.ln_q(q), self.ln_k(k)
        v = self.proj_v(hidden_states).view(B, T, self.num_heads, self.head_dim)
        return q, k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None,
        padding_mask: torch.Tensor | None, output_final_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 1 from `state` on: the recurrent step for one token after a state, the chunked form otherwise; on fla's
        kernels on CUDA when installed, on the torch forms otherwise."""
        on_fla = uses_fla(q)
        options = dict(eps=self.eps, initial_state=state, key_mask=padding_mask)
        if state is not None and q.shape[1] == 1:
            recurrent = fla_linear_attention_recurrent if on_fla else linear_attention_recurrent
            return recurrent(q, k, v, self.feature_map, **options)
        if on_fla:
            return fla_linear_attention_chunked(q, k, v, self.feature_map, output_final_state=output_final_state, **options)
        return linear_attention_chunked(
            q, k, v, self.feature_map, chunk_size=self.chunk_size, output_final_state=output_final_state, **options
        )

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # 1. Projections (and ReBased's normalisation): q, k [B, T, H, F], v [B, T, H, Dv].
        q, k, v = self._project(hidden_states)
        T = q.shape[1]
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        # 2. Attention. Assisted decoding feeds the last accepted token and up to `n` drafted ones (`n` the cache's
        # `get_recurrent_states_to_keep`), then rolls the cache back past the rejected drafts. Rolling back `r <= n`
        # tokens restores the state after token `T - r`, and the cache records the state held before this call
        # followed by all but the last of the states it is given: so it is given the states after each of the last
        # `n + 1` tokens (stepped one by one).
        keep = cache.get_recurrent_states_to_keep(self.layer_idx) if cache is not None else 0
        keep = min(keep + 1, T) if keep else 0
        spans = ([(0, T - keep)] if keep < T else []) + [(t, t + 1) for t in range(T - keep, T)]
        outputs, states = [], []
        for start, end in spans:
            mask = padding_mask[:, start:end] if padding_mask is not None else None
            y, state = self._attend(q[:, start:end], k[:, start:end], v[:, start:end], state, mask, cache is not None)
            outputs.append(y)
            states.append(state)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        # 3. Keep the state (or the last `keep` states), and count the tokens it has seen.
        if cache is not None:
            cache.update_recurrent_state(states[-keep:] if keep else state, self.layer_idx)
            _count_tokens_in_cache(cache, self.layer_idx, hidden_states)
        # 4. Output projection.
        return self.proj_o(y.reshape(*hidden_states.shape[:-1], -1).to(hidden_states.dtype))


def causal_depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise convolution of `x` `[B, E, T]` with `weight` `[E, K]`, continuing from `conv_state`
    `[B, E, K]` (the last K inputs seen) or from zeros. Returns `[B, E, T]`."""
    K = weight.shape[-1]
    context = torch.cat([conv_state.to(x.dtype), x], dim=-1) if conv_state is not None else F.pad(x, (K - 1, 0))
    out = F.conv1d(context, weight.unsqueeze(1), bias, groups=x.shape[1])
    return out[..., -x.shape[-1]:]


class BasedShortConvolution(nn.Module):
    """Gated short convolution (Based's BaseConv): `out_proj(silu(conv(x)) * gate)` with `[x, gate] = in_proj(h)`,
    a causal depthwise convolution of `conv_kernel_size` taps; its last inputs are the conv state in the Cache."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_size = config.conv_kernel_size
        inner = config.conv_expand * config.hidden_size
        self.in_proj = nn.Linear(config.hidden_size, 2 * inner)
        self.conv_weight = nn.Parameter(torch.empty(inner, self.kernel_size))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, T, E] each
        if padding_mask is not None:
            x = x * padding_mask[:, :, None].to(x.dtype)  # padding must look like the zeros before the sequence
        x = x.transpose(1, 2)  # [B, E, T]
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        y = causal_depthwise_conv1d(x, self.conv_weight, self.conv_bias, conv_state)
        if cache is not None:  # after the convolution: the update overwrites `conv_state` in place
            cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel_size)
        return self.out_proj(F.silu(y.transpose(1, 2)) * gate)


class BasedSlidingWindowAttention(LlamaAttention):
    """Causal softmax attention over the last `config.sliding_window` tokens, with rotary embeddings; the window is
    applied by the mask, and the Cache keeps only the last `sliding_window - 1` keys and values."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window


# ----------------------------------------------------------------------------------------------------------------------
# Blocks and models


class BasedDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `h + mixer(norm(h))`, then `h + mlp(norm(h))` when `config.use_mlp`."""

    def __init__(self, config: BasedConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mixer_cls = {
            "linear_attention": BasedLinearAttention, "sliding_attention": BasedSlidingWindowAttention,
            "conv": BasedShortConvolution,
        }[self.layer_type]
        self.mixer = mixer_cls(config, layer_idx)
        if config.use_mlp:
            self.mlp_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.mixer_norm(hidden_states)
        if self.layer_type == "sliding_attention":
            hidden_states, _ = self.mixer(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache,
                sliding_window=self.mixer.sliding_window, **kwargs,
            )
        else:  # for these mixers `attention_mask` is the 2D padding mask (or None)
            hidden_states = self.mixer(hidden_states, cache=cache, padding_mask=attention_mask)
        hidden_states = residual + hidden_states
        if hasattr(self, "mlp"):
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states


class BasedPreTrainedModel(PreTrainedModel):
    config: BasedConfig
    config_class = BasedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BasedDecoderLayer"]
    _supports_sdpa = True
    # `attentions`: the softmax weights of the sliding-window layers only (linear attention and convolutions have none)
    _can_record_outputs = {"hidden_states": BasedDecoderLayer, "attentions": BasedSlidingWindowAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BasedShortConvolution):
            # torch's Conv1d default: uniform in +-1/sqrt(fan_in), fan_in = kernel size for a depthwise filter.
            bound = module.kernel_size**-0.5
            nn.init.uniform_(module.conv_weight, -bound, bound)
            nn.init.uniform_(module.conv_bias, -bound, bound)


class BasedModel(BasedPreTrainedModel):
    """The Based / ReBased backbone: token (and optional learned position) embeddings, `num_hidden_layers` blocks
    of the kinds in `config.layer_types`, a final RMSNorm.

    Examples:

    ```python
    >>> import torch
    >>> from hf_ext.models.based import BasedConfig, BasedModel
    >>> model = BasedModel(BasedConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])

    ```
    """

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.use_learned_positions:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([BasedDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if "sliding_attention" in config.layer_types:
            self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    # The transformers 4 names of `cache`: `past_key_values` (attention models) and `cache_params` (recurrent ones).
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (or pass `inputs_embeds`).
            attention_mask (`torch.Tensor` of shape `(B, T_past + T)`, *optional*): 1 for tokens, 0 for padding.
                Padded positions are kept out of the recurrent and convolution states.
            position_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): positions for the learned position
                embedding and the rotary embedding of sliding-window layers; by default they continue after the
                `cache.get_seq_length()` tokens the cache has seen.
            cache (`Cache`, *optional*): the decoding state from an earlier call (`DynamicCache(config=config)`):
                a fixed-size recurrent state per linear-attention layer, the last `conv_kernel_size` inputs per
                convolution, and at most `sliding_window - 1` keys/values per sliding-window layer.
            inputs_embeds (`torch.Tensor` of shape `(B, T, hidden_size)`, *optional*): instead of `input_ids`.
            use_cache (`bool`, *optional*): return the updated `cache`.

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` `(B, T, hidden_size)`, `cache`, and on request
            `hidden_states` and `attentions` (one per sliding-window layer, with `attn_implementation="eager"`).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        hidden_states = inputs_embeds
        if self.config.use_learned_positions:
            hidden_states = hidden_states + self.embed_positions(position_ids)

        # Per-kind masks: a 2D padding mask for recurrent mixers, a windowed causal mask for attention.
        mask_kwargs = dict(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids,
        )
        padding_mask = create_recurrent_attention_mask(**mask_kwargs)
        masks = {"linear_attention": padding_mask, "conv": padding_mask}
        position_embeddings = None
        if hasattr(self, "rotary_emb"):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
            position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=masks[layer.layer_type], position_embeddings=position_embeddings,
                cache=cache, **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class BasedForCausalLM(BasedPreTrainedModel, GenerationMixin):
    """Based / ReBased with a language-modelling head (tied to the token embedding by default).

    `generate()` keeps a fixed-size state per linear-attention and convolution layer and a window-bounded KV cache
    per sliding-window layer, so decoding memory does not grow with the context.

    Examples:

    ```python
    >>> import torch
    >>> from hf_ext.models.based import BasedConfig, BasedForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = BasedForCausalLM(BasedConfig.mqar(hidden_size=32, vocab_size=64)).eval()
    >>> out = model.generate(torch.tensor([[5, 40, 6, 41, 5]]), max_new_tokens=3, do_sample=False)
    >>> out.shape
    torch.Size([1, 8])

    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.model = BasedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    # The transformers 4 names of `cache`: `past_key_values` (attention models) and `cache_params` (recurrent ones).
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): targets for the next-token loss; they are
                shifted inside, -100 is ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): compute logits only for the last positions.
            Other arguments as [`BasedModel.forward`].

        Returns:
            `CausalLMOutputWithPast` with `loss`, `logits` `(B, T, vocab_size)`, `cache`, `hidden_states` and
            `attentions` (one per sliding-window layer, with `attn_implementation="eager"`).
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "BasedForCausalLM",
    "BasedLinearAttention",
    "BasedModel",
    "BasedPreTrainedModel",
    "causal_depthwise_conv1d",
    "expand_features",
    "fla_linear_attention_chunked",
    "fla_linear_attention_recurrent",
    "kernel_similarity",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
]
