"""DDLMConfig / DDLMModel: noising, score interpolation, loss, time warp, self-conditioning, save/load."""

import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from hf_ext import DDLMConfig, DDLMModel
from hf_ext.models.ddlm.modeling_ddlm import DDLMTimeWarp, draw_conditioning_mask


def tiny_config(**overrides) -> DDLMConfig:
    kwargs = dict(vocab_size=40, embedding_dim=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=16, time_warp_bins=10)
    return DDLMConfig(**{**kwargs, **overrides})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DDLMModel(tiny_config()).eval()


def _reference_attention(attn, x, key_mask=None):
    """Plain softmax(q k^T / sqrt(d_head)) v over the unpadded keys, then the output projection.

    Returns `(B, T, h)` and the `(B, nh, T, T)` weights."""
    B, T, C = x.shape
    q, k, v = attn.qkv_proj(x).view(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    weights = scores.softmax(-1)
    return attn.o_proj((weights @ v).transpose(1, 2).reshape(B, T, C)), weights


def _reference(model, input_ids, sigma, noise, self_conditioning=None, conditioning_mask=None, attention_mask=None):
    """Plain re-statement of CDCD's forward: normalize, noise, scale by 1/sqrt(sigma^2+1), run pre-norm blocks.

    Returns (logits, hidden states [block input, each block's output, the last one after the final norm],
    attention weights per block)."""
    B, T = input_ids.shape
    weight = model.embed_tokens.weight
    clean = weight[input_ids] / weight[input_ids].norm(dim=-1, keepdim=True) * math.sqrt(weight.shape[1])
    mask = torch.zeros(B, T, dtype=torch.bool) if conditioning_mask is None else conditioning_mask
    noisy = torch.where(mask[..., None], clean, clean + sigma[:, None, None] * noise)
    scaled = noisy / torch.sqrt(sigma**2 + 1)[:, None, None]
    sc = torch.zeros_like(noisy) if self_conditioning is None else self_conditioning
    h = (model.input_proj(torch.cat([scaled, sc], -1)) + model.position_embeddings.weight[:T]
         + model.conditioning_embeddings.weight[mask.long()] + model.time_embedding(sigma)[:, None])
    hidden_states, attentions = [h], []
    for layer in model.layers:
        attn_out, weights = _reference_attention(layer.attn, layer.attn_norm(h), attention_mask)
        h = h + attn_out
        h = h + layer.mlp(layer.mlp_norm(h))
        hidden_states.append(h)
        attentions.append(weights)
    hidden_states[-1] = model.norm(h)
    return model.lm_head(hidden_states[-1]), hidden_states, attentions


def _reference_logits(model, input_ids, sigma, noise, self_conditioning=None, conditioning_mask=None):
    return _reference(model, input_ids, sigma, noise, self_conditioning, conditioning_mask)[0]


def test_config_round_trip_and_errors(tmp_path):
    config = tiny_config(sigma_min=0.5, sigma_max=20.0)
    config.save_pretrained(tmp_path)
    loaded = DDLMConfig.from_pretrained(tmp_path)
    assert (loaded.sigma_min, loaded.sigma_max, loaded.model_type) == (0.5, 20.0, "ddlm")

    # `@strict` runs the `validate_*` methods and raises its own error around theirs, as for transformers' configs
    def raises(validator, message):
        return pytest.raises(
            StrictDataclassClassValidationError, match=re.escape(f"'{validator}':\n    ValueError: {message}")
        )

    with raises("validate_noise_range", "`sigma_min` must be > 0 and < `sigma_max`, got sigma_min=10.0, sigma_max=10.0."):
        tiny_config(sigma_min=10.0, sigma_max=10.0)
    with raises("validate_rates", "`self_conditioning_rate` must be in [0, 1], got 1.5."):
        tiny_config(self_conditioning_rate=1.5)
    with raises("validate_architecture", "`hidden_size` (30) must be divisible by `num_attention_heads` (4)."):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with raises("validate_architecture", "`time_warp_bins` must be >= 1, got 0."):
        tiny_config(time_warp_bins=0)
    with raises("validate_rates", "`prefix_mask_rate` + `span_mask_rate` must be <= 1, got 0.6 + 0.5"):
        tiny_config(prefix_mask_rate=0.6, span_mask_rate=0.5)


def test_embeddings_are_normalized_and_x0_hat_is_softmax_times_E(model):
    E = model.embedding_matrix()
    torch.testing.assert_close(E.norm(dim=-1), torch.full((40,), math.sqrt(8)))
    ids = torch.randint(0, 40, (2, 6))
    out = model(ids, sigma=torch.tensor([1.5, 6.0]), noise=torch.randn(2, 6, 8))
    torch.testing.assert_close(out.x0_hat, torch.einsum("btv,vd->btd", out.logits.softmax(-1), E))


def test_x0_hat_carries_no_gradient_in_training():
    # Regression test: x0_hat was computed with gradient, so a training forward kept its (B, T, V) softmax alive for
    # backward as long as the output was, though the loss never reads it.
    torch.manual_seed(0)
    model = DDLMModel(tiny_config(self_conditioning_rate=0.0)).train()
    ids = torch.randint(0, 40, (2, 6))
    out = model(ids, labels=ids, sigma=torch.tensor([1.5, 6.0]))
    assert out.logits.requires_grad and out.loss.requires_grad
    assert not out.x0_hat.requires_grad and out.x0_hat.grad_fn is None
    torch.testing.assert_close(out.x0_hat, out.logits.detach().softmax(-1) @ model.embedding_matrix().detach())


def test_forward_matches_plain_reference(model):
    ids = torch.randint(0, 40, (3, 7))
    sigma, noise = torch.tensor([1.0, 3.0, 9.0]), torch.randn(3, 7, 8)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, :3] = True
    out = model(ids, sigma=sigma, noise=noise, conditioning_mask=mask)
    torch.testing.assert_close(out.logits, _reference_logits(model, ids, sigma, noise, conditioning_mask=mask))


def test_loss_matches_plain_reference(model):
    ids = torch.randint(0, 40, (3, 7))
    labels = ids.clone()
    labels[0, -1] = -100
    sigma, noise = torch.tensor([1.0, 3.0, 9.0]), torch.randn(3, 7, 8)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[2, :2] = True  # prompt prefix: not scored
    out = model(ids, labels=labels, sigma=sigma, noise=noise, conditioning_mask=mask)

    logits = _reference_logits(model, ids, sigma, noise, conditioning_mask=mask)
    scored = (labels != -100) & ~mask
    ce_tokens = torch.stack([F.cross_entropy(logits[b, t], ids[b, t]) for b, t in scored.nonzero()])
    ce = ce_tokens.mean()
    per_seq = torch.stack([
        torch.stack([F.cross_entropy(logits[b, t], ids[b, t]) for t in range(7) if scored[b, t]]).mean() for b in range(3)
    ])
    tau = (sigma - 1.0) / 9.0
    warp_loss = ((model.time_warp.predicted_loss(tau) - per_seq) ** 2).mean()
    torch.testing.assert_close(out.time_warp_loss, warp_loss)
    torch.testing.assert_close(out.loss, ce + model.config.time_warp_loss_weight * warp_loss)


def test_time_warp_loss_trains_only_the_warp(model):
    ids = torch.randint(0, 40, (4, 6))
    out = model(ids, labels=ids, sigma=torch.tensor([1.0, 2.0, 5.0, 9.0]))
    out.time_warp_loss.backward()
    assert model.time_warp.bias.grad.abs() > 0
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0


def test_time_warp_cdf_monotone_inverse_and_sampling():
    torch.manual_seed(1)
    warp = DDLMTimeWarp(num_bins=8)
    with torch.no_grad():
        warp.logits.copy_(torch.randn(8) * 2)
    tau = torch.linspace(0, 1, 401)
    cdf = warp.cdf(tau).detach()
    assert cdf[0] == 0 and cdf[-1] == 1 and (cdf.diff() > 0).all()
    torch.testing.assert_close(warp.inverse_cdf(cdf), tau, atol=1e-5, rtol=0)
    # identity at initialisation
    torch.testing.assert_close(DDLMTimeWarp(4).inverse_cdf(tau), tau)
    # inverse-transform sampling: the empirical CDF of F^-1(u) is F (Kolmogorov-Smirnov distance)
    samples = warp.inverse_cdf(torch.rand(20000)).sort().values
    empirical = torch.arange(1, 20001) / 20000
    assert (warp.cdf(samples).detach() - empirical).abs().max() < 0.015


def test_sampled_sigmas_follow_the_warp():
    model = DDLMModel(tiny_config(sigma_min=1.0, sigma_max=5.0))
    with torch.no_grad():
        model.time_warp.logits.copy_(torch.tensor([5.0] + [0.0] * 9))  # most mass in the first tenth of tau
    sigma = model.sample_sigma(1000, torch.device("cpu"))
    assert sigma.min() >= 1.0 and sigma.max() <= 5.0
    expected_share = model.time_warp.cdf(torch.tensor(0.1)).item()
    assert abs((sigma <= 1.4).float().mean().item() - expected_share) < 0.01  # stratified u: error <= 1/B


def test_self_conditioning_path():
    torch.manual_seed(0)
    model = DDLMModel(tiny_config(self_conditioning_rate=1.0)).train()
    ids = torch.randint(0, 40, (2, 6))
    sigma, noise, mask = torch.tensor([2.0, 4.0]), torch.randn(2, 6, 8), torch.zeros(2, 6, dtype=torch.bool)
    out = model(ids, labels=ids, sigma=sigma, noise=noise, conditioning_mask=mask)
    first = _reference_logits(model, ids, sigma, noise).softmax(-1) @ model.embedding_matrix()
    expected = _reference_logits(model, ids, sigma, noise, self_conditioning=first.detach())
    torch.testing.assert_close(out.logits, expected)
    # rate 0: one pass, no self-conditioning
    model.config.self_conditioning_rate = 0.0
    out = model(ids, sigma=sigma, noise=noise, conditioning_mask=mask)
    torch.testing.assert_close(out.logits, _reference_logits(model, ids, sigma, noise))


def test_training_conditioning_masks():
    torch.manual_seed(0)
    prefix = draw_conditioning_mask(64, 10, prefix_rate=1.0, span_rate=0.0, device=torch.device("cpu"))
    lengths = prefix.sum(-1)
    assert (lengths >= 1).all() and (lengths <= 9).all()
    assert torch.equal(prefix, torch.arange(10) < lengths[:, None])  # prefixes
    span = draw_conditioning_mask(64, 10, prefix_rate=0.0, span_rate=1.0, device=torch.device("cpu"))
    assert (span.sum(-1) < 10).all() and (span.long().diff(dim=-1).abs().sum(-1) <= 2).all()  # one contiguous span
    none = draw_conditioning_mask(8, 10, prefix_rate=0.0, span_rate=0.0, device=torch.device("cpu"))
    assert not none.any()


def test_remote_code_reload_without_hf_ext(model):
    from hf_ext.testing import reload_in_subprocess

    ids = torch.randint(0, 40, (2, 6))
    inputs = {"input_ids": ids, "sigma": torch.tensor([2.0, 5.0]), "noise": torch.randn(2, 6, 8)}
    outputs, class_name = reload_in_subprocess(model, inputs, hf_ext_importable=False, trust_remote_code=True)
    assert not class_name.startswith("hf_ext")
    with torch.no_grad():
        expected = model(**inputs)
    torch.testing.assert_close(outputs["logits"], expected.logits, rtol=0, atol=0)


def _padded_batch(seed=0):
    """Inputs of a 2-layer model: 3 sequences of 7 tokens, the last two padded, fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    return dict(input_ids=ids, attention_mask=attention_mask, sigma=torch.tensor([1.0, 3.0, 9.0]),
                noise=torch.randn(3, 7, 8, generator=generator))


def test_output_hidden_states_and_attentions_match_reference():
    model = DDLMModel(tiny_config(num_hidden_layers=2)).eval()
    model.set_attn_implementation("eager")  # attention weights come from the eager implementation, as in transformers
    inputs = _padded_batch()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        logits, hidden_states, attentions = _reference(model, inputs["input_ids"], inputs["sigma"], inputs["noise"],
                                                       attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(out.logits, logits)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    for got, expected in zip(out.hidden_states, hidden_states, strict=True):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(out.attentions, attentions, strict=True):
        torch.testing.assert_close(got, expected)
    assert (out.attentions[0][2, :, :, 3:] == 0).all()  # padded keys get no weight
    # the same from the config, and as a tuple: hidden states and attentions come last, in transformers' order
    model.config.output_hidden_states = model.config.output_attentions = True
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
    assert len(as_tuple) == 6  # logits, x0_hat, sigma, conditioning_mask, hidden_states, attentions
    torch.testing.assert_close(as_tuple[0], logits)
    torch.testing.assert_close(as_tuple[-2][-1], hidden_states[-1])
    torch.testing.assert_close(as_tuple[-1][1], attentions[1])


def test_hidden_states_come_from_the_self_conditioned_pass():
    model = DDLMModel(tiny_config(num_hidden_layers=2, self_conditioning_rate=1.0)).train()
    inputs = {k: v for k, v in _padded_batch().items() if k != "attention_mask"}
    mask = torch.zeros(3, 7, dtype=torch.bool)
    out = model(**inputs, conditioning_mask=mask, output_hidden_states=True)
    first = _reference_logits(model, inputs["input_ids"], inputs["sigma"], inputs["noise"]).softmax(-1)
    self_conditioning = (first @ model.embedding_matrix()).detach()
    _, hidden_states, _ = _reference(model, inputs["input_ids"], inputs["sigma"], inputs["noise"], self_conditioning)
    assert len(out.hidden_states) == 3  # the gradient-free first pass is not recorded
    for got, expected in zip(out.hidden_states, hidden_states, strict=True):
        torch.testing.assert_close(got, expected)


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=inputs["input_ids"], conditioning_mask=torch.zeros(3, 7, dtype=torch.bool),
                self_conditioning=torch.zeros(3, 7, 8))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_sdpa_matches_eager_outputs_and_gradients():
    """SDPA and eager attention: same logits and same parameter gradients, to 1e-5 in float32."""
    torch.manual_seed(0)
    sdpa = DDLMModel(tiny_config(num_hidden_layers=2)).train()
    sdpa.set_attn_implementation("sdpa")
    eager = DDLMModel(tiny_config(num_hidden_layers=2)).train()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    inputs = _padded_batch()
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as spy:
        out_sdpa, grads_sdpa = _loss_and_grads(sdpa, inputs)
        assert spy.call_count == 2  # one call per block: the SDPA path really ran
        out_eager, grads_eager = _loss_and_grads(eager, inputs)
        assert spy.call_count == 2  # and the eager one did not
    torch.testing.assert_close(out_sdpa.logits, out_eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_sdpa.loss, out_eager.loss, atol=1e-5, rtol=1e-5)
    assert grads_sdpa.keys() == grads_eager.keys() and "layers.1.attn.qkv_proj.weight" in grads_sdpa
    for name in grads_sdpa:
        torch.testing.assert_close(grads_sdpa[name], grads_eager[name], atol=1e-5, rtol=1e-5, msg=name)


def test_sdpa_matches_eager_in_bfloat16():
    """bfloat16 logits of the two implementations agree to transformers' common-test tolerance (rtol 1e-2, atol
    3e-2 times the largest logit)."""
    torch.manual_seed(0)
    sdpa = DDLMModel(tiny_config(num_hidden_layers=2)).to(torch.bfloat16).eval()
    sdpa.set_attn_implementation("sdpa")
    eager = DDLMModel(tiny_config(num_hidden_layers=2)).to(torch.bfloat16).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    inputs = {**_padded_batch(), "noise": _padded_batch()["noise"].bfloat16()}
    with torch.no_grad():
        logits_sdpa, logits_eager = sdpa(**inputs).logits, eager(**inputs).logits
    assert logits_sdpa.dtype == torch.bfloat16
    atol = 3e-2 * logits_eager.abs().max().item()
    torch.testing.assert_close(logits_sdpa, logits_eager, atol=atol, rtol=1e-2)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(attn_implementation, use_reentrant):
    """With activation checkpointing each block runs twice (forward, then again in backward) and the gradients are
    those of the plain run (to 1e-6 in float32)."""
    model = DDLMModel(tiny_config(num_hidden_layers=2)).train()
    model.set_attn_implementation(attn_implementation)
    inputs = _padded_batch()
    block_runs = []  # a pre-hook on each block's first module (non-reentrant recomputation may stop before the end)
    for layer in model.layers:
        layer.attn_norm.register_forward_pre_hook(lambda *_: block_runs.append(1))
    out_plain, grads_plain = _loss_and_grads(model, inputs)
    assert len(block_runs) == 2
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    out_ckpt, grads_ckpt = _loss_and_grads(model, inputs)
    assert len(block_runs) == 2 + 4  # each block recomputed once in backward
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-6, msg=name)


def test_trainer_with_activation_checkpointing_changes_parameters(tmp_path):
    from datasets import Dataset
    from transformers import AutoModel, Trainer, TrainingArguments

    model = AutoModel.from_config(tiny_config(self_conditioning_rate=0.0))  # registered by `import hf_ext`
    assert isinstance(model, DDLMModel)
    ids = torch.randint(0, 40, (8, 8))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                             activation_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    # the loss is not a plain token mean, so Trainer scales it for accumulation itself (no `num_items_in_batch`)
    assert trainer.model_accepts_loss_kwargs is False
    block_runs = []
    model.layers[0].attn_norm.register_forward_pre_hook(lambda *_: block_runs.append(1))
    trainer.train()
    assert model.is_activation_checkpointing
    assert len(block_runs) == 2 * 2  # per step: the checkpointed forward, then its recomputation in backward
    after = model.state_dict()
    for name in ("lm_head.weight", "embed_tokens.weight", "time_warp.logits", "time_warp.bias"):
        assert not torch.equal(before[name], after[name]), name
