"""Touches of transformers' private names (see :mod:`hf_ext._compat`)."""

from transformers import PreTrainedConfig

from hf_ext._compat import PrivateAPIChanged, private_touch, require_attr


def _probe_attention_implementation() -> None:
    name = "hf_ext._compat.transformers.attention_implementation"
    if not isinstance(require_attr(PreTrainedConfig, "_attn_implementation", name), property):
        raise PrivateAPIChanged(f"{name}: PreTrainedConfig._attn_implementation is no longer a property.")
    if PreTrainedConfig(attn_implementation="sdpa")._attn_implementation != "sdpa":
        raise PrivateAPIChanged(f"{name}: PreTrainedConfig._attn_implementation no longer reads back `attn_implementation`.")


@private_touch(
    "transformers",
    "5.25.0",
    names=("PreTrainedConfig._attn_implementation",),
    public_alternative=(
        "none in 5.25: `attn_implementation=` and `PreTrainedModel.set_attn_implementation()` set it, but nothing "
        "public reads back which implementation a built model runs"
    ),
    probe=_probe_attention_implementation,
)
def attention_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a model built from ``config`` runs (``"eager"``, ``"sdpa"``,
    ``"flash_attention_2"``, ...); ``None`` before a model has resolved it."""
    return require_attr(config, "_attn_implementation", "hf_ext._compat.transformers.attention_implementation")


__all__ = ["attention_implementation"]
