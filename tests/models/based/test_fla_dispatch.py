"""The optional flash-linear-attention path: which kernel each case takes, that CPU never takes it, and that its
numbers equal the torch forms' (on CPU through Triton's interpreter; on CUDA where a GPU is present)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_ext.models.based import modeling_based
from hf_ext.models.based.modeling_based import (
    fla_linear_attention_chunked,
    fla_linear_attention_recurrent,
    linear_attention_chunked,
    linear_attention_recurrent,
)

from .test_modeling_based import KERNELS, tiny_model

HERE = Path(__file__).parent


def _recording_ops(calls: list) -> SimpleNamespace:
    """Stand-ins for fla's kernels that log `(kernel, feature width)` and return zeros of the right shapes."""

    def parallel(name):
        def op(q, k, v):
            calls.append((name, q.shape[-1]))
            return torch.zeros(v.shape)
        return op

    def stateful(name):
        def op(q, k, v, scale, initial_state, output_final_state, normalize):
            calls.append((name, q.shape[-1]))
            assert scale == 1.0 and not normalize
            state = torch.zeros(q.shape[0], q.shape[2], q.shape[-1], v.shape[-1]) if output_final_state else None
            return torch.zeros(v.shape), state
        return op

    return SimpleNamespace(
        parallel={"rebased": parallel("parallel_rebased"), "taylor": parallel("parallel_based")},
        chunk=stateful("chunk_linear_attn"), recurrent=stateful("fused_recurrent_linear_attn"),
    )


def test_each_case_takes_the_kernel_that_computes_it(monkeypatch):
    calls = []
    monkeypatch.setattr(modeling_based, "_fla_ops", lambda: _recording_ops(calls))
    x = torch.randn(1, 5, 2, 4)
    fla_linear_attention_chunked(x, x, x, "rebased", output_final_state=False)
    fla_linear_attention_chunked(x, x, x, "taylor", output_final_state=False)
    fla_linear_attention_chunked(x, x, x, "rebased", output_final_state=True)  # prefill
    _, state = fla_linear_attention_chunked(x, x, x, "taylor", output_final_state=True)
    fla_linear_attention_recurrent(x[:, :1], x[:, :1], x[:, :1], "taylor", initial_state=state)
    wide = torch.randn(1, 2, 1, 129)  # wider than fla's parallel kernels allow
    fla_linear_attention_chunked(wide, wide, wide, "rebased", output_final_state=False)
    assert calls == [
        ("parallel_rebased", 4), ("parallel_based", 4), ("chunk_linear_attn", 16), ("chunk_linear_attn", 1 + 4 + 16),
        ("fused_recurrent_linear_attn", 1 + 4 + 16), ("chunk_linear_attn", 129 * 129),
    ]


def test_cpu_tensors_take_the_torch_forms_even_with_fla_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(modeling_based, "_fla_ops", lambda: _recording_ops(calls))
    assert not modeling_based.uses_fla(torch.zeros(1))
    model = tiny_model()
    ids = torch.randint(1, 63, (2, 6))
    model(ids)
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls == []


# Importing fla's kernels imports torch._inductor, whose own module code (torch/utils/mkldnn.py) warns that
# `torch.jit.script_method` is deprecated: torch's warning about torch's code, hf_ext not involved.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fla_older_than_the_checked_release_is_not_used(monkeypatch):
    fla = pytest.importorskip("fla")
    monkeypatch.setattr(fla, "__version__", "0.2.0")
    modeling_based._fla_ops.cache_clear()
    try:
        assert modeling_based._fla_ops() is None
    finally:
        monkeypatch.undo()
        modeling_based._fla_ops.cache_clear()
    assert modeling_based._fla_ops() is not None


def test_cpu_runs_never_import_fla():
    # (triton itself may be imported by peft when installed; fla, and the kernels it compiles, must not be)
    pytest.importorskip("fla")
    code = (
        "import sys, torch, hf_ext\n"
        "from hf_ext.models.based import BasedConfig, BasedForCausalLM\n"
        "model = BasedForCausalLM(BasedConfig.mqar(vocab_size=32, hidden_size=16, num_attention_heads=2)).eval()\n"
        "model.generate(torch.randint(1, 31, (1, 5)), max_new_tokens=2, do_sample=False, pad_token_id=0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fla'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_fla_kernels_equal_the_torch_forms_in_the_triton_interpreter():
    """fla's kernel source, run by Triton's CPU interpreter: training (outputs, dq, dk, dv), prefill from a state,
    decoding, and a padded model forward and cached greedy generation through the mixer's dispatch."""
    pytest.importorskip("fla")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "fla_interpreter_check.py")], capture_output=True, text=True, env=env, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(f"{fm}/{case}" for fm in KERNELS for case in ("training", "prefill", "recurrent", "model"))
    for case, diffs in report.items():
        for name, diff in diffs.items():
            assert diff <= (0 if name == "tokens_differ" else 1e-4), (case, name, diff)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels. Triton rounds float32 matmul inputs to TF32 (10-bit mantissa) on Ampere and newer GPUs,
# so the bound is TF32's rounding (2^-11 relative) summed over a few hundred terms, not float32's 1e-4.

CUDA_ATOL = 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feature_map", KERNELS)
def test_cuda_fla_forms_match_the_torch_forms(feature_map):
    pytest.importorskip("fla")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, d, device="cuda") for d in (16, 16, 64))
    key_mask = torch.ones(2, 300, device="cuda")
    key_mask[0, :7] = 0
    # training: outputs and gradients
    results = {}
    for name, form in (("fla", fla_linear_attention_chunked), ("torch", linear_attention_chunked)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = form(*leaves, feature_map, key_mask=key_mask, output_final_state=False)
        out.square().sum().backward()
        results[name] = [out.detach()] + [x.grad for x in leaves]
    for a, b in zip(results["fla"], results["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=CUDA_ATOL, rtol=CUDA_ATOL)
    # prefill from a state, then one decoding step
    _, prefix = linear_attention_chunked(q[:, :100], k[:, :100], v[:, :100], feature_map, key_mask=key_mask[:, :100])
    rest = (q[:, 100:], k[:, 100:], v[:, 100:])
    out, state = fla_linear_attention_chunked(*rest, feature_map, initial_state=prefix)
    expected, expected_state = linear_attention_chunked(*rest, feature_map, initial_state=prefix)
    torch.testing.assert_close(out, expected, atol=CUDA_ATOL, rtol=CUDA_ATOL)
    torch.testing.assert_close(state, expected_state, atol=CUDA_ATOL * expected_state.abs().max().item(), rtol=0)
    step = (q[:, :1], k[:, :1], v[:, :1])
    out, _ = fla_linear_attention_recurrent(*step, feature_map, initial_state=state)
    expected, _ = linear_attention_recurrent(*step, feature_map, initial_state=state)
    torch.testing.assert_close(out, expected, atol=CUDA_ATOL, rtol=CUDA_ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feature_map", KERNELS)
def test_cuda_model_on_fla_matches_the_model_on_torch_forms(feature_map, monkeypatch):
    pytest.importorskip("fla")
    model = tiny_model(feature_map=feature_map, sliding=True).cuda()
    ids = torch.randint(1, 63, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert modeling_based.uses_fla(ids)
    fla_logits = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(modeling_based, "uses_fla", lambda x: False)
    torch_logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fla_logits[mask.bool()], torch_logits[mask.bool()], atol=CUDA_ATOL, rtol=CUDA_ATOL)
