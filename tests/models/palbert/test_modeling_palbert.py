import math

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AlbertModel,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification
from hf_ext.models.palbert.modeling_palbert import (
    PalbertLambdaHead,
    exit_distribution,
    kl_to_prior,
    q_exit_step,
    truncated_geometric_prior,
)
from hf_ext.testing import lay_out_as_hub_repo, reload_in_subprocess, tiny_albert_config

NUM_STEPS = 6


def _albert_fields() -> dict:
    fields = tiny_albert_config().to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return {**fields, "num_hidden_layers": NUM_STEPS}


def _tiny_albert_config(**overrides) -> AlbertConfig:
    return AlbertConfig(**{**_albert_fields(), **overrides})


def _tiny_config(**overrides) -> PalbertConfig:
    return PalbertConfig(**{**_albert_fields(), "lambda_head_layers": 1, **overrides})


def _tiny_palbert(seed: int = 0, **overrides) -> PalbertForSequenceClassification:
    """A random tiny PALBERT whose exit head is scaled up, so that examples exit at different steps."""
    torch.manual_seed(seed)
    model = PalbertForSequenceClassification(_tiny_config(**{"initializer_range": 0.5, **overrides})).eval()
    for module in model.lambda_head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=5.0 / module.in_features**0.5)
            torch.nn.init.normal_(module.bias, mean=-1.0, std=0.5)
    return model


def _batch(batch_size: int = 12, seed: int = 1):
    """Right-padded ids `(B, T)` and mask of varied lengths; each row mostly repeats its own token, so rows differ.

    The first token is id 1, the CLS stand-in.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (batch_size,), generator=gen)
    shape = (batch_size, int(lengths.max()))
    theme = torch.randint(5, 100, (batch_size, 1), generator=gen)
    noise = torch.randint(5, 100, shape, generator=gen)
    input_ids = torch.where(torch.rand(shape, generator=gen) < 0.7, theme, noise)
    input_ids[:, 0] = 1
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return input_ids * attention_mask, attention_mask, lengths


def _reference_steps(model, input_ids, attention_mask):
    """Plain reference: stock AlbertModel hidden states, then pooler, classifier and lambda head per step."""
    hidden_states = model.albert(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    step_logits, lambdas = [], []
    previous = torch.zeros(input_ids.shape[0], model.config.hidden_size)
    for t, hidden in enumerate(hidden_states[-NUM_STEPS:]):
        pooled = torch.tanh(model.albert.pooler(hidden[:, 0]))
        step_logits.append(model.classifier(pooled))
        if t < NUM_STEPS - 1:
            lambdas.append(torch.sigmoid(model.lambda_head(pooled, previous)))
        previous = pooled
    return torch.stack(step_logits, 1), torch.stack(lambdas, 1)


def _plain_exit_probs(lambdas):
    rows = []
    for row in lambdas.tolist():
        p, survival = [], 1.0
        for lam in row:
            p.append(survival * lam)
            survival *= 1 - lam
        rows.append(p + [survival])
    return torch.tensor(rows)


def _plain_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# --- the formulas -----------------------------------------------------------------------------------


def test_exit_distribution_hand_computed():
    p = exit_distribution(torch.tensor([[0.2, 0.5, 0.1], [1.0, 0.3, 0.3]]))
    expected = torch.tensor([[0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.1, 0.8 * 0.5 * 0.9], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(exit_distribution(torch.zeros(2, 0)), torch.ones(2, 1))  # one step: it takes all


def test_truncated_geometric_prior_and_kl_against_plain_reference():
    prior = truncated_geometric_prior(0.1, 4, dtype=torch.float64)
    torch.testing.assert_close(prior, torch.tensor([0.1, 0.09, 0.081, 0.729], dtype=torch.float64))
    p = torch.tensor([[0.5, 0.25, 0.0, 0.25], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    kl = kl_to_prior(p, prior)
    expected = torch.tensor([_plain_kl(row, prior.tolist()) for row in p.tolist()], dtype=torch.float64)
    torch.testing.assert_close(kl, expected)
    # The paper's KL(p || p_G), not the reference code's KL(p_G || p).
    reverse = _plain_kl(prior.tolist(), p[1].tolist())
    assert abs(kl[1].item() - reverse) > 0.01


def test_saturated_exit_head_gives_finite_gradients():
    # In float32 sigmoid(30) is exactly 1, so the later p_t are exactly 0 (p log p at 0 must not give 0/0);
    # in float64 it is not, which gives the reference gradient.
    logits32 = torch.tensor([[0.0, 30.0, 0.3], [1.0, -2.0, 30.0]], requires_grad=True)
    logits64 = logits32.detach().double().requires_grad_()
    for logits in (logits32, logits64):
        p = exit_distribution(torch.sigmoid(logits))
        kl_to_prior(p, truncated_geometric_prior(0.1, 4, dtype=p.dtype)).sum().backward()
    assert (exit_distribution(torch.sigmoid(logits32)) == 0).sum() == 3
    torch.testing.assert_close(logits32.grad, logits64.grad.float(), atol=1e-6, rtol=1e-4)

    model = _tiny_palbert()
    torch.nn.init.constant_(model.lambda_head.out.bias, 50.0)  # every lambda_t = 1: p = (1, 0, ..., 0)
    input_ids, attention_mask, _ = _batch(batch_size=4)
    model(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.classifier.weight.grad.abs().sum() > 0


def test_q_exit_step_hand_computed():
    p = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.3, 0.2, 0.4, 0.1], [0.1, 0.1, 0.1, 0.7], [0.2, 0.3, 0.25, 0.25]])
    assert q_exit_step(p, 0.5).tolist() == [1, 3, 4, 3]  # 0.2 + 0.3 = 0.5 does not exceed q
    assert q_exit_step(p, 0.25).tolist() == [1, 1, 3, 2]


def test_lambda_heads_hand_computed():
    torch.manual_seed(0)
    pooled, previous = torch.randn(3, 32), torch.randn(3, 32)
    # Revisited (PALBERT): Lambda([pooled_t; pooled_{t-1}]), 3 x (Linear(2H, 2H) + Tanh) then Linear(2H, 1).
    head = PalbertLambdaHead(_tiny_config(lambda_head_layers=3)).eval()
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 64)] * 3 + [(1, 64)]
    x = torch.cat([pooled, previous], dim=-1)
    for linear in linears[:-1]:
        x = torch.tanh(x @ linear.weight.T + linear.bias)
    torch.testing.assert_close(head(pooled, previous), (x @ linears[-1].weight.T + linears[-1].bias)[:, 0])
    # With no hidden blocks the order of the halves is visible: +1 on pooled_t, -1 on pooled_{t-1}.
    head = PalbertLambdaHead(_tiny_config(lambda_head_layers=0)).eval()
    torch.nn.init.constant_(head.out.bias, 0.5)
    head.out.weight.data = torch.cat([torch.ones(1, 32), -torch.ones(1, 32)], dim=-1)
    torch.testing.assert_close(head(pooled, previous), pooled.sum(-1) - previous.sum(-1) + 0.5)
    # Linear (PonderNet): w^T pooled_t + b; the previous state is not read.
    head = PalbertLambdaHead(_tiny_config(lambda_head="linear")).eval()
    assert [tuple(m.weight.shape) for m in head.modules() if isinstance(m, torch.nn.Linear)] == [(1, 32)]
    expected = pooled @ head.out.weight[0] + head.out.bias
    torch.testing.assert_close(head(pooled, previous), expected)
    torch.testing.assert_close(head(pooled, torch.zeros_like(previous)), expected)


# --- the model against the plain reference ---------------------------------------------------------


def test_loss_and_modes_match_plain_reference():
    model = _tiny_palbert()
    input_ids, attention_mask, _ = _batch()
    labels = torch.randint(0, 2, (input_ids.shape[0],))
    step_logits, lambdas = _reference_steps(model, input_ids, attention_mask)
    p = _plain_exit_probs(lambdas)
    prior = [0.1 * 0.9**k for k in range(NUM_STEPS - 1)] + [0.9 ** (NUM_STEPS - 1)]

    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.exit_probs, p, atol=1e-5, rtol=1e-5)
    task = sum(
        p[b, t] * F.cross_entropy(step_logits[b, t][None], labels[b][None])
        for b in range(len(labels))
        for t in range(NUM_STEPS)
    ) / len(labels)
    kl = sum(_plain_kl(row, prior) for row in p.tolist()) / len(labels)
    torch.testing.assert_close(out.loss, task + 0.5 * kl, atol=1e-5, rtol=1e-5)

    full = model(input_ids, attention_mask=attention_mask, inference_mode="full")
    torch.testing.assert_close(full.logits, step_logits[:, -1], atol=1e-5, rtol=1e-5)
    assert full.exit_step.tolist() == [NUM_STEPS] * len(labels)
    expectation = model(input_ids, attention_mask=attention_mask, inference_mode="expectation")
    mixture = (p[..., None] * step_logits.softmax(-1)).sum(1).log()
    torch.testing.assert_close(expectation.logits, mixture, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [{}, {"num_hidden_groups": 2, "inner_group_num": 2}])
def test_full_mode_equals_albert_for_sequence_classification(groups):
    # Two groups of two layers: steps 1-3 use group 0 and steps 4-6 group 1, as in ALBERT's encoder loop.
    model = _tiny_palbert(hidden_dropout_prob=0.0, **groups)
    albert = AlbertForSequenceClassification(_tiny_albert_config(initializer_range=0.5, **groups)).eval()
    missing, unexpected = albert.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("lambda_head.") for key in unexpected)
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        expected = albert(input_ids, attention_mask=attention_mask).logits
        full = model(input_ids, attention_mask=attention_mask, inference_mode="full")
        torch.testing.assert_close(full.logits, expected)


# --- batched early exit ----------------------------------------------------------------------------


@torch.no_grad()
def test_q_exit_batch_equals_one_by_one_and_dense_rule():
    model = _tiny_palbert(exit_threshold=0.6)
    input_ids, attention_mask, lengths = _batch(batch_size=16)
    batch = model(input_ids, attention_mask=attention_mask)
    assert batch.exit_probs is None  # later steps of exited examples were never computed
    assert len(set(batch.exit_step.tolist())) >= 3  # the check below covers several exit steps
    for i, length in enumerate(lengths.tolist()):
        alone = model(input_ids[i : i + 1, :length])  # unpadded, batch of one
        assert alone.exit_step.item() == batch.exit_step[i].item()
        torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-5, rtol=1e-5)
    # The same exits and logits as the rule applied after running every step (the path taken with labels).
    dense = model(input_ids, attention_mask=attention_mask, labels=torch.zeros(16, dtype=torch.long))
    assert dense.exit_step.tolist() == batch.exit_step.tolist()
    assert dense.exit_step.tolist() == q_exit_step(dense.exit_probs, 0.6).tolist()
    assert (dense.exit_probs.cumsum(-1) - 0.6).abs().min() > 1e-3  # no exit decided by rounding
    torch.testing.assert_close(dense.logits, batch.logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_active_batch_shrinks():
    model = _tiny_palbert()
    rows_per_call = []
    hook = model.albert.encoder.albert_layer_groups[0].register_forward_pre_hook(
        lambda module, args: rows_per_call.append(args[0].shape[0])
    )
    input_ids, attention_mask, _ = _batch(batch_size=16)
    try:
        out = model(input_ids, attention_mask=attention_mask)
        early_calls = list(rows_per_call)
        rows_per_call.clear()
        model(input_ids, attention_mask=attention_mask, inference_mode="full")
    finally:
        hook.remove()
    still_running = [int((out.exit_step > t).sum()) for t in range(NUM_STEPS)]
    assert early_calls == [n for n in still_running if n > 0]
    assert sum(early_calls) == int(out.exit_step.sum()) < 16 * NUM_STEPS
    assert rows_per_call == [16] * NUM_STEPS


@torch.no_grad()
@pytest.mark.parametrize("mode", ["q_exit", "sample"])
def test_certain_exit_heads_give_hand_computed_exit_steps(mode):
    model = _tiny_palbert()
    input_ids, attention_mask, _ = _batch(batch_size=5)
    torch.nn.init.zeros_(model.lambda_head.out.weight)
    torch.nn.init.constant_(model.lambda_head.out.bias, 50.0)  # lambda_1 = 1: everyone exits at step 1
    first = model(input_ids, attention_mask=attention_mask, inference_mode=mode)
    assert first.exit_step.tolist() == [1] * 5
    torch.nn.init.constant_(model.lambda_head.out.bias, -50.0)  # lambda_t = 0: everyone runs to the last step
    last = model(input_ids, attention_mask=attention_mask, inference_mode=mode)
    assert last.exit_step.tolist() == [NUM_STEPS] * 5
    full = model(input_ids, attention_mask=attention_mask, inference_mode="full")
    torch.testing.assert_close(last.logits, full.logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("with_labels", [False, True])  # step-by-step Bernoulli exits, or t ~ p after all steps
def test_sample_mode_follows_the_exit_distribution(with_labels):
    model = _tiny_palbert()
    input_ids, attention_mask, _ = _batch(batch_size=1)
    full = model(input_ids, attention_mask=attention_mask, inference_mode="full")
    repeated = input_ids.expand(2000, -1)
    labels = torch.zeros(2000, dtype=torch.long) if with_labels else None
    out = model(repeated, attention_mask=attention_mask.expand(2000, -1), labels=labels, inference_mode="sample")
    frequencies = torch.bincount(out.exit_step - 1, minlength=NUM_STEPS).float() / 2000
    torch.testing.assert_close(frequencies, full.exit_probs[0], atol=0.04, rtol=0)
    step_logits, _ = _reference_steps(model, input_ids, attention_mask)
    torch.testing.assert_close(out.logits, step_logits[0, out.exit_step - 1], atol=1e-5, rtol=1e-5)


def test_regression():
    model = _tiny_palbert(num_labels=1)
    input_ids, attention_mask, _ = _batch()
    labels = torch.randn(input_ids.shape[0])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    step_logits, lambdas = _reference_steps(model, input_ids, attention_mask)
    p = _plain_exit_probs(lambdas)
    task = ((step_logits.squeeze(-1) - labels[:, None]) ** 2 * p).sum(-1).mean()
    prior = [0.1 * 0.9**k for k in range(NUM_STEPS - 1)] + [0.9 ** (NUM_STEPS - 1)]
    kl = sum(_plain_kl(row, prior) for row in p.tolist()) / len(labels)
    torch.testing.assert_close(out.loss, task + 0.5 * kl, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expectation = model(input_ids, attention_mask=attention_mask, inference_mode="expectation").logits
        early = model(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(expectation, (p[..., None] * step_logits).sum(1), atol=1e-5, rtol=1e-5)
    assert early.logits.shape == (input_ids.shape[0], 1)
    rows = torch.arange(len(labels))
    torch.testing.assert_close(early.logits, step_logits[rows, early.exit_step - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": torch.tensor([0.0, 1.0])}, "`labels` must be class indices"),
        ({"labels": torch.tensor([0, 1, 1])}, r"`labels` must hold one value per example \(2\), got shape \(3,\)"),
        ({"inputs_embeds": torch.zeros(2, 4, 16)}, "exactly one of `input_ids` and `inputs_embeds`"),
    ],
)
def test_bad_forward_inputs_raise(kwargs, message):
    model = _tiny_palbert()
    with pytest.raises(ValueError, match=message):
        model(torch.ones(2, 4, dtype=torch.long), **kwargs)


# --- saving, loading, remote code ----------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = _tiny_palbert(exit_threshold=0.7, lambda_head="revisited")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is PalbertForSequenceClassification and loaded.config.exit_threshold == 0.7
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        a, b = model(input_ids, attention_mask=attention_mask), loaded(input_ids, attention_mask=attention_mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_step, b.exit_step)


@pytest.mark.parametrize("hf_ext_importable", [True, False])
def test_remote_code_reload_in_subprocess(hf_ext_importable):
    model = _tiny_palbert()
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask)
    outputs, class_name = reload_in_subprocess(
        model, {"input_ids": input_ids, "attention_mask": attention_mask},
        auto_class="AutoModelForSequenceClassification",
        hf_ext_importable=hf_ext_importable, trust_remote_code=not hf_ext_importable,
    )
    if hf_ext_importable:
        assert class_name == "hf_ext.models.palbert.modeling_palbert.PalbertForSequenceClassification"
    else:
        assert class_name.startswith("transformers_modules.")
        assert class_name.endswith("PalbertForSequenceClassification")
    torch.testing.assert_close(outputs["logits"], expected.logits)
    assert torch.equal(outputs["exit_step"], expected.exit_step)


def test_from_albert_pretrained_reuses_encoder_and_pooler(tmp_path):
    torch.manual_seed(3)
    albert = AlbertForSequenceClassification(_tiny_albert_config()).eval()
    albert.save_pretrained(tmp_path / "albert")
    albert_state = albert.state_dict()

    model = PalbertForSequenceClassification.from_albert_pretrained(tmp_path / "albert", exit_threshold=0.6)
    assert model.config.model_type == "palbert" and model.config.exit_threshold == 0.6
    assert model.config.hidden_size == albert.config.hidden_size
    state = model.state_dict()
    for key, value in albert_state.items():  # embeddings, shared layer, pooler and the same-shaped classifier
        assert torch.equal(state[key], value), key
    assert {k for k in state if k not in albert_state} == {k for k in state if k.startswith("lambda_head.")}

    # As a Hub id (from a local Hub cache), with a new label count: the classifier is new, the rest reused.
    lay_out_as_hub_repo(tmp_path / "albert", "org/tiny-albert", tmp_path / "cache")
    model = PalbertForSequenceClassification.from_albert_pretrained(
        "org/tiny-albert", cache_dir=tmp_path / "cache", local_files_only=True, num_labels=3
    )
    assert model.classifier.weight.shape == (3, albert.config.hidden_size)
    for key, value in albert_state.items():
        if key.startswith("albert."):
            assert torch.equal(model.state_dict()[key], value), key


def test_from_albert_pretrained_from_a_bare_albert_model(tmp_path):
    # AlbertModel checkpoints store their weights without the "albert." prefix.
    torch.manual_seed(4)
    albert = AlbertModel(_tiny_albert_config()).eval()
    albert.save_pretrained(tmp_path)
    model = PalbertForSequenceClassification.from_albert_pretrained(tmp_path)
    state = model.state_dict()
    for key, value in albert.state_dict().items():
        assert torch.equal(state[f"albert.{key}"], value), key


def test_from_albert_pretrained_rejects_other_checkpoints(tmp_path):
    _tiny_palbert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'palbert' checkpoint"):
        PalbertForSequenceClassification.from_albert_pretrained(tmp_path)


# --- Trainer ---------------------------------------------------------------------------------------


def test_trainer_step_changes_parameters(tmp_path):
    from datasets import Dataset

    model = _tiny_palbert()
    model.train()
    input_ids, attention_mask, _ = _batch(batch_size=8)
    data = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": [0, 1] * 4}
    )
    before = {k: v.clone() for k, v in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert "lambda_head.out.weight" in changed and "classifier.weight" in changed
    assert "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight" in changed

    # Evaluation gathers the extra outputs: exit steps by the Q-exit rule and the exit distribution.
    prediction = trainer.predict(data)
    logits, exit_step, exit_probs = (torch.as_tensor(x) for x in prediction.predictions)
    assert logits.shape == (8, 2) and exit_probs.shape == (8, NUM_STEPS)
    torch.testing.assert_close(exit_probs.sum(-1), torch.ones(8))
    assert exit_step.tolist() == q_exit_step(exit_probs, model.config.exit_threshold).tolist()
    with torch.no_grad():
        expected = model.eval()(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1] * 4))
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert prediction.metrics["test_loss"] == pytest.approx(expected.loss.item(), rel=1e-4)
