"""Based / ReBased modeling: the three linear-attention forms, cached decoding, save/load, remote code, training."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_ext.models.based import BasedConfig, BasedForCausalLM, modeling_based
from hf_ext.models.based.modeling_based import (
    BasedLinearAttention,
    expand_features,
    fla_linear_attention_chunked,
    fla_linear_attention_recurrent,
    kernel_similarity,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)

KERNELS = ["rebased", "taylor"]


def _plain_reference(q, k, v, feature_map, eps=1e-12):
    """Eq. 1 written out with loops over i <= j, in float64: the spec the forms are checked against."""
    B, T, H, F = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        s = torch.einsum("bhf,bjhf->bjh", q[:, i].double(), k[:, : i + 1].double()) / F**0.5  # [B, i+1, H]
        sim = s**2 if feature_map == "rebased" else 1 + s + s**2 / 2
        out[:, i] = torch.einsum("bjh,bjhd->bhd", sim, v[:, : i + 1].double()) / (sim.sum(1)[..., None] + eps)
    return out


def tiny_config(feature_map="rebased", sliding=False, **overrides):
    layer_types = ["conv", "linear_attention", "sliding_attention"] if sliding else ["conv", "linear_attention"]
    defaults = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types), layer_types=layer_types, num_attention_heads=2,
        feature_map=feature_map, feature_dim=4, chunk_size=4, sliding_window=3, intermediate_size=48, conv_expand=1,
        pad_token_id=0, eos_token_id=63,
        initializer_range=0.5,  # large enough that greedy tokens vary: equal generations must not be constant ones
    )
    return BasedConfig(**{**defaults, **overrides})


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BasedForCausalLM(tiny_config(**kwargs)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Kernels and the three forms


def test_kernels_match_hand_computed_values():
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    k = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # s = q.k / sqrt(4) = 1: ReBased s^2 = 1, Taylor 1 + s + s^2/2 = 2.5
    assert kernel_similarity(q, k, "rebased").item() == pytest.approx(1.0)
    assert kernel_similarity(q, k, "taylor").item() == pytest.approx(2.5)
    assert expand_features(q, "rebased").shape[-1] == 16 and expand_features(q, "taylor").shape[-1] == 1 + 4 + 16


@pytest.mark.parametrize("feature_map", KERNELS)
def test_feature_maps_reproduce_the_kernel(feature_map):
    q, k = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    via_features = expand_features(q, feature_map) @ expand_features(k, feature_map).transpose(-1, -2)
    torch.testing.assert_close(via_features, kernel_similarity(q, k, feature_map), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_map", KERNELS)
@pytest.mark.parametrize("T, chunk_size", [(1, 4), (13, 4), (16, 16), (21, 8)])
def test_three_forms_agree_with_the_plain_reference(feature_map, T, chunk_size):
    q, k, v = torch.randn(2, T, 3, 4), torch.randn(2, T, 3, 4), torch.randn(2, T, 3, 5)
    expected = _plain_reference(q, k, v, feature_map).float()
    parallel = linear_attention_parallel(q, k, v, feature_map)
    chunked, chunked_state = linear_attention_chunked(q, k, v, feature_map, chunk_size=chunk_size)
    recurrent, recurrent_state = linear_attention_recurrent(q, k, v, feature_map)
    for output in (parallel, chunked, recurrent):
        assert (output - expected).abs().max() <= 1e-4
    assert (chunked_state - recurrent_state).abs().max() <= 1e-4 * recurrent_state.abs().max()
    # the state's last column is the normaliser z = sum_j phi(k_j)
    torch.testing.assert_close(recurrent_state[..., -1], expand_features(k, feature_map).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("feature_map", KERNELS)
def test_chunked_gradients_match_parallel(feature_map):
    q, k, v = (torch.randn(1, 11, 2, 4, requires_grad=True) for _ in range(3))
    grads = []
    for form in ("parallel", "chunked"):
        out = linear_attention_parallel(q, k, v, feature_map) if form == "parallel" else \
            linear_attention_chunked(q, k, v, feature_map, chunk_size=4)[0]
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for g_parallel, g_chunked in zip(*grads, strict=True):
        torch.testing.assert_close(g_chunked, g_parallel, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_map", KERNELS)
def test_masked_keys_are_skipped_and_state_continues(feature_map):
    q, k, v = torch.randn(2, 12, 2, 4), torch.randn(2, 12, 2, 4), torch.randn(2, 12, 2, 3)
    key_mask = torch.ones(2, 12)
    key_mask[1, :5] = 0  # left padding of row 1
    full, full_state = linear_attention_chunked(q, k, v, feature_map, chunk_size=4, key_mask=key_mask)
    # row 1 equals the same row without its first 5 positions
    alone = linear_attention_parallel(q[1:, 5:], k[1:, 5:], v[1:, 5:], feature_map)
    torch.testing.assert_close(full[1:, 5:], alone, atol=1e-4, rtol=1e-4)
    # prefix then continuation from its state == one pass
    head, head_state = linear_attention_chunked(q[:, :7], k[:, :7], v[:, :7], feature_map, chunk_size=4, key_mask=key_mask[:, :7])
    tail, tail_state = linear_attention_chunked(
        q[:, 7:], k[:, 7:], v[:, 7:], feature_map, chunk_size=4, initial_state=head_state, key_mask=key_mask[:, 7:]
    )
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tail_state, full_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "form", [linear_attention_parallel, linear_attention_chunked, linear_attention_recurrent,
             fla_linear_attention_chunked, fla_linear_attention_recurrent],
)
def test_forms_take_their_options_by_keyword_only(form):
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(TypeError, match="positional argument"):
        form(q, q, q, "rebased", 1e-6)


@pytest.mark.parametrize("feature_norm, gamma_size", [("joint", 2 * 4), ("per_head", 4)])
def test_rebased_normalisation_joint_or_per_head(feature_norm, gamma_size):
    config = tiny_config(feature_norm=feature_norm)
    mixer = BasedLinearAttention(config, layer_idx=1)
    assert mixer.ln_q.weight.shape == (gamma_size,) and mixer.ln_k.bias.shape == (gamma_size,)
    x = torch.randn(1, 3, 32)
    q, _, _ = mixer._project(x)
    flat = mixer.proj_q(x)
    expected = (flat - flat.mean(-1, keepdim=True)) / (flat.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    if feature_norm == "per_head":
        per_head = flat.view(1, 3, 2, 4)
        expected = (per_head - per_head.mean(-1, keepdim=True)) / (per_head.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(q, expected.reshape(1, 3, 2, 4), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Cached decoding


def _step_by_step_logits(model, ids, prefix, pass_positions=True):
    """Logits of `ids` from a prefill of its first `prefix` tokens, then one cached step per token."""
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            positions = {"position_ids": torch.tensor([[t]])} if pass_positions else {}
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True, **positions)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("feature_map", KERNELS)
@pytest.mark.parametrize("sliding", [False, True])
def test_cached_logits_match_full_forward(feature_map, sliding):
    model = tiny_model(feature_map=feature_map, sliding=sliding)
    ids = torch.randint(1, 63, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
    assert (_step_by_step_logits(model, ids, prefix=6) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("feature_map", KERNELS)
@pytest.mark.parametrize("sliding", [False, True])
def test_cached_generation_equals_uncached_with_left_padding(feature_map, sliding):
    # without attention layers the model takes learned positions (the MQAR model): they come from `position_ids`
    model = tiny_model(feature_map=feature_map, sliding=sliding, use_learned_positions=not sliding)
    ids = torch.randint(1, 63, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 is left-padded
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 9:].tolist())) > 2
    # the padded row generates what the same prompt generates alone
    alone = model.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cached[1, 9:], alone[0, 5:])


# The two layouts of the common tests: conv first (the MQAR model, learned positions) and linear attention first
# (rotary sliding-window attention after it), where layer 0's cache holds only a recurrent state.
LAYOUTS = {
    "conv_first": dict(layer_types=["conv", "linear_attention"], use_learned_positions=True),
    "linear_first": dict(layer_types=["linear_attention", "sliding_attention"]),
}


def layout_model(layout, seed=0, **overrides):
    layer_types = LAYOUTS[layout]["layer_types"]
    return tiny_model(seed, **{**LAYOUTS[layout], "num_hidden_layers": len(layer_types), **overrides})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_counts_the_tokens_it_holds(layout):
    model = layout_model(layout)
    with torch.no_grad():
        cache = model(torch.randint(1, 63, (2, 5)), use_cache=True).cache
        assert int(cache.get_seq_length()) == 5
        model(torch.randint(1, 63, (2, 1)), cache=cache, use_cache=True)
        model(torch.randint(1, 63, (2, 3)), cache=cache, use_cache=True)
    assert [int(cache.get_seq_length(i)) for i in range(2)] == [9, 9]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoding_without_position_ids_continues_the_positions(layout):
    model = layout_model(layout)
    ids = torch.randint(1, 63, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
    assert (_step_by_step_logits(model, ids, prefix=5, pass_positions=False) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_continues_from_a_returned_cache(layout):
    model = layout_model(layout)
    ids = torch.randint(1, 63, (1, 9))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache  # the prompt's first 6 tokens, already seen
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), expected)
    assert int(cache.get_seq_length()) == 9 + 6 - 1  # the last generated token is never fed back


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_lookup_and_assisted_decoding_equal_greedy_decoding(layout):
    # Both draft several tokens, verify them in one forward and roll the cache back past the rejected ones, so the
    # recurrent state of every drafted position must be kept until then.
    model = layout_model(layout)
    prompt = torch.randint(1, 63, (1, 5)).repeat(1, 3)  # repeated n-grams: prompt lookup drafts from them
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=3, **kwargs), greedy)
    assistant = layout_model(layout, seed=1)  # drafts tokens the model mostly rejects
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **kwargs), greedy)


@pytest.mark.parametrize("old_name", ["past_key_values", "cache_params"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_old_cache_keywords_warn_and_give_the_same_logits(layout, old_name):
    model = layout_model(layout)
    ids = torch.randint(1, 63, (2, 7))
    for model_or_backbone in (model, model.model):
        caches = []
        for _ in range(2):
            with torch.no_grad():
                caches.append(model_or_backbone(ids[:, :4], use_cache=True).cache)
        with torch.no_grad(), pytest.warns(FutureWarning, match=f"`{old_name}` is deprecated .* Use `cache` instead"):
            old = model_or_backbone(ids[:, 4:], use_cache=True, **{old_name: caches[0]})
        with torch.no_grad():
            new = model_or_backbone(ids[:, 4:], use_cache=True, cache=caches[1])
        field = "logits" if model_or_backbone is model else "last_hidden_state"
        assert torch.equal(old[field], new[field]) and old.cache is caches[0]
        assert int(old.cache.get_seq_length()) == 7


def _cache_bytes(cache):
    tensors = []
    for layer in cache.layers:
        tensors += [t for t in getattr(layer, "recurrent_states", {}).values() if t is not None]
        tensors += [t for t in getattr(layer, "conv_states", {}).values() if t is not None]
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("sliding", [False, True])
def test_decode_state_size_is_independent_of_context_length(sliding):
    model = tiny_model(sliding=sliding)
    sizes = []
    for context in (8, 64):
        with torch.no_grad():
            out = model(torch.randint(1, 63, (1, context)), use_cache=True)
            out = model(torch.tensor([[5]]), cache=out.cache, position_ids=torch.tensor([[context]]), use_cache=True)
        sizes.append(_cache_bytes(out.cache))
    assert sizes[0] == sizes[1] > 0


# ---------------------------------------------------------------------------------------------------------------------
# Save / load and remote code


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(sliding=True, feature_norm="per_head")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BasedForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(1, 63, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("hf_ext_importable", [True, False])
def test_reload_in_fresh_process(hf_ext_importable):
    from hf_ext.testing import reload_in_subprocess

    model = tiny_model(feature_map="taylor", sliding=True)
    inputs = {"input_ids": torch.randint(1, 63, (2, 6))}
    outputs, class_name = reload_in_subprocess(
        model, inputs, auto_class="AutoModelForCausalLM", hf_ext_importable=hf_ext_importable,
        trust_remote_code=not hf_ext_importable,
    )
    expected_module = "hf_ext.models.based.modeling_based" if hf_ext_importable else "transformers_modules."
    assert class_name.startswith(expected_module) and class_name.endswith("BasedForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(**inputs).logits, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_with_activation_checkpointing_updates_parameters(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model(sliding=True).train()
    ids = torch.randint(1, 63, (8, 12))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        activation_checkpointing=True, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
    )
    before = _snapshot(model)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    assert model.is_activation_checkpointing
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("mixer.proj_q" in n for n in changed) and any("mixer.conv_weight" in n for n in changed)
    assert any("mixer.q_proj" in n for n in changed)  # the sliding-window attention


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model(sliding=True).train()
    ids = torch.randint(1, 63, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


# TRL 1.16's own `disable_gradient_checkpointing` (around each reference forward) reads and toggles the model's
# `is_gradient_checkpointing` / `gradient_checkpointing_disable` / `gradient_checkpointing_enable`, which transformers
# 5.25 deprecated: TRL's code calling transformers', hf_ext not involved.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_dpo_trainer_accepts_the_model(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from hf_ext.data.preference import preference_dataset
    from hf_ext.testing import get_tiny_tokenizer

    tokenizer = get_tiny_tokenizer()
    torch.manual_seed(0)
    model = BasedForCausalLM(tiny_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    ))
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, bf16=False,
        activation_checkpointing=True, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
    )
    before = _snapshot(model)
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_dataset(8, seed=0),
        processing_class=tokenizer,
    )
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feature_map", KERNELS)
def test_cuda_matches_cpu_in_float32_and_bfloat16(feature_map, monkeypatch):
    # the torch forms on CUDA (fla's TF32 kernels are checked against them in test_fla_dispatch.py)
    monkeypatch.setattr(modeling_based, "uses_fla", lambda x: False)
    q, k, v = torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 32)
    expected = linear_attention_parallel(q, k, v, feature_map)
    chunked, _ = linear_attention_chunked(*(x.cuda() for x in (q, k, v)), feature_map, chunk_size=64)
    assert (chunked.cpu() - expected).abs().max() <= 1e-4
    # bf16 inputs: computed in float32 inside, so only the output's bf16 rounding (2^-8 relative) remains
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    low, _ = linear_attention_chunked(q16.cuda(), k16.cuda(), v16.cuda(), feature_map, chunk_size=64)
    expected_low = linear_attention_parallel(q16.float(), k16.float(), v16.float(), feature_map)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float().cpu(), expected_low, rtol=2**-7, atol=1e-3)
    model = tiny_model(feature_map=feature_map, sliding=True)
    ids = torch.randint(1, 63, (2, 9))
    cpu_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cuda_tokens = model.cuda().generate(ids.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cuda_tokens.cpu(), cpu_tokens)
