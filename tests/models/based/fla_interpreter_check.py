"""Runs fla's Triton kernels on CPU through Triton's interpreter and prints, as one JSON line, the largest
differences between the fla forms and the torch forms, for `test_fla_dispatch.py` to check.

Run with `TRITON_INTERPRET=1` in the environment (Triton reads it when fla's kernels are defined, hence a separate
process). Two interpreter gaps are bridged here, neither of which changes what a kernel computes:
- the autotuner times its configurations with a GPU driver; here it takes the first configuration;
- `chunk_fwd_kernel_h` calls `.to()` on its loop counter, which the interpreter leaves a Python int; its `range`
  yields Triton scalars instead.
"""

import builtins
import json
import os
import sys

import torch
import triton.language as tl
import triton.runtime.autotuner

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
triton.runtime.autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: [0.0] * len(quantiles))

import fla.ops.common.chunk_h  # noqa: E402

fla.ops.common.chunk_h.range = lambda *args: (tl.full((), i, tl.int32) for i in builtins.range(*args))

from hf_ext.models.based import modeling_based  # noqa: E402
from hf_ext.models.based.modeling_based import (  # noqa: E402
    fla_linear_attention_chunked,
    fla_linear_attention_recurrent,
    linear_attention_chunked,
    linear_attention_recurrent,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


def inputs(T: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, T, 2, 16, generator=generator) for _ in range(2))  # F = 16: phi is 256 or 273 wide
    v = torch.randn(2, T, 2, 64, generator=generator)  # [v, 1] is 65 wide, past a power-of-two tile
    key_mask = torch.ones(2, T)
    key_mask[0, :5] = 0  # left padding in the first row
    return q, k, v, key_mask


def check_training_form(feature_map: str) -> dict[str, float]:
    """No state in or out: fla's parallel kernels; outputs and gradients."""
    q, k, v, key_mask = inputs(T=37, seed=0)
    weights = torch.randn(v.shape)
    results = {}
    for name, form in (("fla", fla_linear_attention_chunked), ("torch", linear_attention_chunked)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, state = form(*leaves, feature_map, key_mask=key_mask, output_final_state=False)
        assert state is None
        (out * weights).sum().backward()
        results[name] = [out.detach()] + [x.grad for x in leaves]
    fla_out, torch_out = results["fla"], results["torch"]
    return {"output": max_diff(fla_out[0], torch_out[0])} | {
        f"grad_{n}": relative_diff(a, b) for n, a, b in zip("qkv", fla_out[1:], torch_out[1:], strict=True)
    }


def check_prefill_form(feature_map: str) -> dict[str, float]:
    """From a state, returning the final state: fla's chunk kernel on the expanded features (150 tokens: 3 of its
    64-token chunks)."""
    q, k, v, key_mask = inputs(T=170, seed=1)
    _, prefix_state = linear_attention_chunked(q[:, :20], k[:, :20], v[:, :20], feature_map, key_mask=key_mask[:, :20])
    rest = (q[:, 20:], k[:, 20:], v[:, 20:])
    fla_out, fla_state = fla_linear_attention_chunked(*rest, feature_map, initial_state=prefix_state)
    torch_out, torch_state = linear_attention_chunked(*rest, feature_map, initial_state=prefix_state)
    return {"output": max_diff(fla_out, torch_out), "state": relative_diff(fla_state, torch_state)}


def check_recurrent_form(feature_map: str) -> dict[str, float]:
    q, k, v, key_mask = inputs(T=9, seed=2)
    _, state = linear_attention_chunked(q[:, :6], k[:, :6], v[:, :6], feature_map, key_mask=key_mask[:, :6])
    rest = (q[:, 6:], k[:, 6:], v[:, 6:])
    fla_out, fla_state = fla_linear_attention_recurrent(*rest, feature_map, initial_state=state)
    torch_out, torch_state = linear_attention_recurrent(*rest, feature_map, initial_state=state)
    return {"output": max_diff(fla_out, torch_out), "state": relative_diff(fla_state, torch_state)}


def check_model(feature_map: str) -> dict[str, float]:
    """The mixer's dispatch, forced on for CPU tensors: a full forward, and cached greedy generation with padding."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_modeling_based import tiny_model

    model = tiny_model(feature_map=feature_map, sliding=True)
    ids = torch.randint(1, 63, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    def run():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return logits, tokens

    torch_logits, torch_tokens = run()
    uses_fla, modeling_based.uses_fla = modeling_based.uses_fla, lambda x: True
    try:
        fla_logits, fla_tokens = run()
    finally:
        modeling_based.uses_fla = uses_fla
    real = mask.bool()
    return {
        "logits": max_diff(fla_logits[real], torch_logits[real]),
        "tokens_differ": float((fla_tokens != torch_tokens).sum().item()),
    }


if __name__ == "__main__":
    report = {}
    for feature_map in ("rebased", "taylor"):
        report[f"{feature_map}/training"] = check_training_form(feature_map)
        report[f"{feature_map}/prefill"] = check_prefill_form(feature_map)
        report[f"{feature_map}/recurrent"] = check_recurrent_form(feature_map)
        report[f"{feature_map}/model"] = check_model(feature_map)
    print(json.dumps(report))
