"""In-memory interpolation: the maths per tensor, dense models, and PEFT LoRA through its scaling."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from hf_ext.merging import interpolate_models, interpolate_state_dict, lerp
from hf_ext.testing import tiny_gpt2, tiny_llama

# PEFT 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.25 deprecated for
# `is_activation_checkpointing`: every get_peft_model on a transformers model warns, whatever hf_ext does.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _reference(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's formula, in float64."""
    return base.double() + alpha * (tuned.double() - base.double())


# ------------------------------------------------------------------------------------------- lerp


@pytest.mark.parametrize("alpha", [-1.0, -0.25, 0.3, 0.5, 0.75, 2.0])
def test_lerp_matches_formula(alpha):
    base, tuned = torch.randn(64, 16), torch.randn(64, 16)
    out = lerp(base, tuned, alpha)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(base, tuned, alpha), rtol=1e-6, atol=1e-6)


def test_lerp_hand_computed_extrapolation():
    base, tuned = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 4.0])
    assert lerp(base, tuned, -1.0).tolist() == [-1.0, 0.0]
    assert lerp(base, tuned, 2.0).tolist() == [2.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lerp_endpoints_bit_for_bit(dtype):
    base, tuned = (torch.randn(1000) * 10).to(dtype), (torch.randn(1000) * 1e-3).to(dtype)
    assert torch.equal(lerp(base, tuned, 0.0), base)
    assert torch.equal(lerp(base, tuned, 1.0), tuned)
    assert lerp(base, tuned, 0.5).dtype == dtype


def test_lerp_bf16_computes_in_fp32_and_rounds_once():
    base, tuned = torch.randn(4096).bfloat16(), torch.randn(4096).bfloat16()
    expected = (base.double() + 0.3 * (tuned.double() - base.double())).bfloat16()  # exact, rounded once
    in_bf16 = base + 0.3 * (tuned - base)  # rounded at every step
    assert not torch.equal(in_bf16, expected)  # the test can tell the two apart
    out = lerp(base, tuned, 0.3)
    assert out.dtype == torch.bfloat16
    assert (out != expected).float().mean() < 0.01  # fp32 rounding may flip a rare last bit
    assert (out != expected).sum() < (in_bf16 != expected).sum() / 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [-1.0, 0.3, 0.7, 2.0])
def test_lerp_reduced_precision_equals_float32_reference(dtype, alpha):
    base, tuned = torch.randn(100_000).to(dtype), torch.randn(100_000).to(dtype)
    reference = torch.lerp(base.float(), tuned.float(), alpha).to(dtype)  # upcast, compute, round once
    assert torch.equal(lerp(base, tuned, alpha), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_lerp_out_writes_the_same_bits(dtype, out_dtype):
    base, tuned = torch.randn(1000).to(dtype), torch.randn(1000).to(dtype)
    out = torch.full((1000,), float("nan"), dtype=out_dtype or dtype)
    assert lerp(base, tuned, 0.3, dtype=out_dtype, out=out) is out
    assert torch.equal(out, lerp(base, tuned, 0.3, dtype=out_dtype))


def test_lerp_dtype_argument_casts_once():
    base, tuned = torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    assert lerp(base, tuned, 0.25, dtype=torch.float32).item() == 1.0 + 0.25 * 2**-7


# ------------------------------------------------------------------------------------- state dicts


def test_interpolate_state_dict_integer_tensors_from_tuned_and_key_errors():
    base = {"w": torch.zeros(3), "ids": torch.tensor([1, 2])}
    tuned = {"w": torch.ones(3), "ids": torch.tensor([5, 6])}
    out = interpolate_state_dict(base, tuned, 0.25)
    assert out["w"].tolist() == [0.25] * 3 and out["ids"].tolist() == [5, 6]
    with pytest.raises(ValueError, match=r"1 missing from tuned \['ids'\], 1 unexpected in tuned \['bias'\]"):
        interpolate_state_dict(base, {"w": torch.ones(3), "bias": torch.ones(1)}, 0.5)


# ------------------------------------------------------------------------------------ dense models


def test_interpolate_models_matches_formula_and_leaves_inputs_alone():
    base, tuned = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    out = interpolate_models(base, tuned, 0.3)
    for name, param in out.named_parameters():
        torch.testing.assert_close(param.double(), _reference(base.get_parameter(name), tuned.get_parameter(name), 0.3))
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert out.lm_head.weight is out.transformer.wte.weight  # ties survive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolate_models_endpoints_bit_for_bit(dtype):
    base, tuned = tiny_gpt2(seed=0).to(dtype), tiny_gpt2(seed=1).to(dtype)
    for alpha, expected in ((0.0, base), (1.0, tuned)):
        out = interpolate_models(base, tuned, alpha)
        for name, param in out.named_parameters():
            assert param.dtype == dtype
            assert torch.equal(param, expected.get_parameter(name)), name


def test_interpolate_models_inplace_writes_into_tuned():
    base, tuned = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    expected = interpolate_models(base, tuned, -0.5)
    out = interpolate_models(base, tuned, -0.5, inplace=True)
    assert out is tuned
    assert all(torch.equal(p, expected.get_parameter(n)) for n, p in tuned.named_parameters())


def test_module_only_in_tuned_is_kept_and_module_only_in_base_is_dropped():
    from transformers import GPT2ForSequenceClassification

    base = tiny_gpt2(seed=0)  # has lm_head (tied)
    torch.manual_seed(1)
    tuned = GPT2ForSequenceClassification(copy.deepcopy(base.config)).eval()  # a new `score` head
    out = interpolate_models(base, tuned, 0.5)
    assert torch.equal(out.score.weight, tuned.score.weight)
    assert not hasattr(out, "lm_head")
    torch.testing.assert_close(
        out.transformer.h[0].mlp.c_fc.weight.double(),
        _reference(base.transformer.h[0].mlp.c_fc.weight, tuned.transformer.h[0].mlp.c_fc.weight, 0.5),
    )


def test_interpolate_models_errors():
    base = tiny_gpt2(seed=0)
    with pytest.raises(ValueError, match=r"differ in shape .*transformer\.wte\.weight: \(\d+, 32\) vs \(200, 32\)"):
        interpolate_models(base, tiny_gpt2(seed=1, vocab_size=200), 0.5)
    with pytest.raises(ValueError, match=r"differ in dtype .*torch.float32 vs torch.bfloat16"):
        interpolate_models(base, tiny_gpt2(seed=1).to(torch.bfloat16), 0.5)
    with pytest.raises(ValueError, match=r"different architectures: model_type 'gpt2' vs 'llama'"):
        interpolate_models(base, tiny_llama(), 0.5)
    with pytest.raises(ValueError, match=r"`alpha` must be finite, got nan"):
        interpolate_models(base, base, float("nan"))
    with pytest.raises(TypeError, match=r"`alpha` must be an int or float, got str '0.5'"):
        interpolate_models(base, base, "0.5")
    with pytest.raises(TypeError, match=r"`tuned` must be a torch.nn.Module"):
        interpolate_models(base, base.state_dict(), 0.5)


# ---------------------------------------------------------------------------------------- PEFT LoRA


def _lora_config(seed_modules=("q_proj", "v_proj"), **kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=list(seed_modules), init_lora_weights=False, **kwargs)


def _dense_reference(base_weights: dict, peft_model, adapters: list[str], alpha: float):
    """W0 + alpha * sum_a scaling_a * B_a @ A_a, written into a plain copy of the base model."""
    from peft.tuners.lora import LoraLayer

    dense = tiny_llama(seed=0)
    dense.load_state_dict(base_weights)
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, LoraLayer):
                target = dense.get_submodule(name)
                for a in [a for a in adapters if a in module.lora_A]:
                    delta = module.scaling[a] * module.lora_B[a].weight @ module.lora_A[a].weight
                    target.weight += alpha * delta
    return dense


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 2.0])
def test_lora_interpolation_is_exact_in_dW(alpha):
    from peft import get_peft_model

    base = tiny_llama(seed=0)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, _lora_config(modules_to_save=["lm_head"]))
    with torch.no_grad():  # pretend the head was fine-tuned beside the adapter
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    ids = torch.randint(5, 100, (2, 7))
    logits_before = peft_model(input_ids=ids).logits

    out = interpolate_models(base, peft_model, alpha)

    dense = _dense_reference(w0, peft_model, ["default"], alpha)
    trained_head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        dense.lm_head.weight.copy_(lerp(w0["lm_head.weight"], trained_head, alpha))
    torch.testing.assert_close(out(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    merged = out.merge_and_unload()
    for name, param in dense.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), param, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(peft_model(input_ids=ids).logits, logits_before, rtol=0, atol=0)  # input untouched


def test_several_lora_adapters_are_combined_in_dW_not_factor_wise():
    from peft import get_peft_model

    base = tiny_llama(seed=0)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, _lora_config())
    peft_model.add_adapter("other", _lora_config(seed_modules=("q_proj", "o_proj")))
    peft_model.base_model.set_adapter(["default", "other"])
    ids = torch.randint(5, 100, (2, 7))

    out = interpolate_models(tiny_llama(seed=0), peft_model, 0.5)  # an equal copy of the base works too

    dense = _dense_reference(w0, peft_model, ["default", "other"], 0.5)
    torch.testing.assert_close(out(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # The factor-wise average (what add_weighted_adapter's "linear" does with A and B) is not that model.
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    factor_wise = 0.25 * (q.lora_B["default"].weight + q.lora_B["other"].weight) @ (q.lora_A["default"].weight + q.lora_A["other"].weight)
    exact = 0.5 * (q.lora_B["default"].weight @ q.lora_A["default"].weight + q.lora_B["other"].weight @ q.lora_A["other"].weight)
    assert not torch.allclose(factor_wise, exact, atol=1e-3)


_RELOAD_ADAPTER = """
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

base, adapter, inputs, outputs = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    save_file({"logits": model(**load_file(inputs)).logits.contiguous()}, outputs)
"""


def test_interpolated_lora_adapter_saves_and_reloads_in_a_fresh_process(tmp_path):
    """The saved adapter holds what the model computes: `PeftModel.from_pretrained` elsewhere gives the same outputs."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file

    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, _lora_config(modules_to_save=["lm_head"]))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    out = interpolate_models(base, peft_model, -0.5)
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        expected, at_one = out(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert not torch.allclose(expected, at_one, atol=1e-3)  # the test can tell an unscaled adapter apart

    out.save_pretrained(tmp_path / "adapter")
    save_file({"input_ids": ids}, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [tmp_path / "base", tmp_path / "adapter", tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"]
    proc = subprocess.run([sys.executable, "-c", _RELOAD_ADAPTER, *map(str, args)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(tmp_path / "outputs.safetensors")["logits"], expected, rtol=0, atol=0)


def test_lora_factors_tied_between_layers_are_scaled_once():
    """With ensure_weight_tying, lm_head's LoRA factors are the embedding's (A_head = B_emb^T, B_head = A_emb^T)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=0, tie_word_embeddings=True)
    dense = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False,
                        ensure_weight_tying=True)
    peft_model = get_peft_model(base, config)
    emb = peft_model.base_model.model.model.embed_tokens
    head = peft_model.base_model.model.lm_head
    assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()  # really tied
    with torch.no_grad():
        dense.model.embed_tokens.weight += 0.5 * emb.get_delta_weight("default")  # [V, C], lm_head tied to it
    with pytest.raises(RuntimeError, match="cannot be copied .*pass inplace=True"):  # the tied views refuse deepcopy
        interpolate_models(base, peft_model, 0.5)
    out = interpolate_models(base, peft_model, 0.5, inplace=True)
    ids = torch.randint(5, 100, (2, 7))
    torch.testing.assert_close(out(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_errors():
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_llama(seed=0), _lora_config())
    with pytest.raises(ValueError, match=r"not the model the PEFT adapter in `tuned` sits on"):
        interpolate_models(tiny_llama(seed=1), peft_model, 0.5)
    with pytest.raises(TypeError, match=r"pass the PEFT model as `tuned`"):
        interpolate_models(peft_model, tiny_llama(seed=0), 0.5)
    dora = get_peft_model(tiny_llama(seed=0), _lora_config(use_dora=True))
    with pytest.raises(ValueError, match=r"not linear in their scaling"):
        interpolate_models(dora.get_base_model(), dora, 0.5)
