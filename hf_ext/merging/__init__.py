"""Parameter-space interpolation between a pre-trained and a fine-tuned model (arXiv 2211.12092).

- :func:`interpolate_models`: in memory, for two models or a PEFT LoRA model on its base;
- :func:`interpolate_checkpoints`: streamed from two checkpoint folders or Hub repos into sharded
  safetensors folders, shard by shard, for one or several alphas in one run;
- :func:`lerp` / :func:`interpolate_state_dict`: the maths on tensors and state dicts.
"""

from hf_ext.merging.checkpoints import interpolate_checkpoints
from hf_ext.merging.interpolation import interpolate_models, interpolate_state_dict, lerp

__all__ = ["interpolate_checkpoints", "interpolate_models", "interpolate_state_dict", "lerp"]
