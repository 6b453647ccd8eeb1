"""Remote-code config for the offline stand-in of `trl-internal-testing/tiny-RemoteForCausalLM` (see trl_offline_hub)."""

from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
