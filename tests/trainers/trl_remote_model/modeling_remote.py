"""Remote-code model for the offline stand-in of `trl-internal-testing/tiny-RemoteForCausalLM`: Qwen2 under another
name, which transformers loads only with `trust_remote_code=True` (see trl_offline_hub)."""

from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
