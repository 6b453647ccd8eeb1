"""DDLMConfig / DDLMModel: noising, score interpolation, loss, time warp, self-conditioning, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

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


def _reference_logits(model, input_ids, sigma, noise, self_conditioning=None, conditioning_mask=None):
    """Plain re-statement of CDCD's forward: normalize, noise, scale by 1/sqrt(sigma^2+1), run the blocks."""
    B, T = input_ids.shape
    weight = model.embed_tokens.weight
    clean = weight[input_ids] / weight[input_ids].norm(dim=-1, keepdim=True) * math.sqrt(weight.shape[1])
    mask = torch.zeros(B, T, dtype=torch.bool) if conditioning_mask is None else conditioning_mask
    noisy = torch.where(mask[..., None], clean, clean + sigma[:, None, None] * noise)
    scaled = noisy / torch.sqrt(sigma**2 + 1)[:, None, None]
    sc = torch.zeros_like(noisy) if self_conditioning is None else self_conditioning
    h = (model.input_proj(torch.cat([scaled, sc], -1)) + model.position_embeddings.weight[:T]
         + model.conditioning_embeddings.weight[mask.long()] + model.time_embedding(sigma)[:, None])
    for layer in model.layers:
        h = layer(h, None)
    return model.lm_head(model.norm(h))


def test_config_round_trip_and_errors(tmp_path):
    config = tiny_config(sigma_min=0.5, sigma_max=20.0)
    config.save_pretrained(tmp_path)
    loaded = DDLMConfig.from_pretrained(tmp_path)
    assert (loaded.sigma_min, loaded.sigma_max, loaded.model_type) == (0.5, 20.0, "ddlm")
    with pytest.raises(ValueError, match="sigma_min"):
        tiny_config(sigma_min=10.0, sigma_max=10.0)
    with pytest.raises(ValueError, match="self_conditioning_rate"):
        tiny_config(self_conditioning_rate=1.5)
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="time_warp_bins"):
        tiny_config(time_warp_bins=0)
    with pytest.raises(ValueError, match=r"`prefix_mask_rate` \+ `span_mask_rate` must be <= 1, got 0.6 \+ 0.5"):
        tiny_config(prefix_mask_rate=0.6, span_mask_rate=0.5)


def test_embeddings_are_normalized_and_x0_hat_is_softmax_times_E(model):
    E = model.embedding_matrix()
    torch.testing.assert_close(E.norm(dim=-1), torch.full((40,), math.sqrt(8)))
    ids = torch.randint(0, 40, (2, 6))
    out = model(ids, sigma=torch.tensor([1.5, 6.0]), noise=torch.randn(2, 6, 8))
    torch.testing.assert_close(out.x0_hat, torch.einsum("btv,vd->btd", out.logits.softmax(-1), E))


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


def test_trainer_step_changes_parameters(tmp_path):
    from datasets import Dataset
    from transformers import AutoModel, Trainer, TrainingArguments

    model = AutoModel.from_config(tiny_config())  # registered by `import hf_ext`
    assert isinstance(model, DDLMModel)
    ids = torch.randint(0, 40, (8, 8))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=dataset).train()
    after = model.state_dict()
    for name in ("lm_head.weight", "embed_tokens.weight", "time_warp.logits", "time_warp.bias"):
        assert not torch.equal(before[name], after[name]), name
