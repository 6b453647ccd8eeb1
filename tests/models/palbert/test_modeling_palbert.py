import math

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AlbertModel,
    AutoModel,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification, PalbertModel
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
    for key in ("model_type", "transformers_version", "architectures", "id2label", "label2id"):  # num_labels sets them
        fields.pop(key, None)
    return {**fields, "num_hidden_layers": NUM_STEPS}


def _tiny_albert_config(**overrides) -> AlbertConfig:
    return AlbertConfig(**{**_albert_fields(), **overrides})


def _tiny_config(**overrides) -> PalbertConfig:
    return PalbertConfig(**{**_albert_fields(), "lambda_head_layers": 1, **overrides})


def _tiny_palbert(seed: int = 1, **overrides) -> PalbertForSequenceClassification:
    """A random tiny PALBERT whose exit head is scaled up, so that examples exit at different steps."""
    torch.manual_seed(seed)
    model = PalbertForSequenceClassification(_tiny_config(**{"initializer_range": 0.5, **overrides})).eval()
    for module in model.albert.lambda_head.modules():
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


def _albert_state_dict(model) -> dict:
    """PALBERT's weights without the exit head: ALBERT's, under the same names."""
    return {key: value for key, value in model.state_dict().items() if not key.startswith("albert.lambda_head.")}


def _stock_albert(model) -> AlbertModel:
    """A stock `AlbertModel` holding PALBERT's encoder and pooler."""
    groups = {"num_hidden_groups": model.config.num_hidden_groups, "inner_group_num": model.config.inner_group_num}
    albert = AlbertModel(_tiny_albert_config(**groups)).eval()
    state = {k.removeprefix("albert."): v for k, v in _albert_state_dict(model).items() if k.startswith("albert.")}
    albert.load_state_dict(state)
    return albert


def _reference_steps(model, input_ids, attention_mask):
    """Plain reference: stock AlbertModel hidden states, then pooler, classifier and lambda head per step."""
    albert = _stock_albert(model)
    hidden_states = albert(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    step_logits, lambdas = [], []
    previous = torch.zeros(input_ids.shape[0], model.config.hidden_size)
    for t, hidden in enumerate(hidden_states[-NUM_STEPS:]):
        pooled = torch.tanh(albert.pooler(hidden[:, 0]))
        step_logits.append(model.classifier(pooled))
        if t < NUM_STEPS - 1:
            lambdas.append(torch.sigmoid(model.albert.lambda_head(pooled, previous)))
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
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


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
    torch.nn.init.constant_(model.albert.lambda_head.out.bias, 50.0)  # every lambda_t = 1: p = (1, 0, ..., 0)
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
    albert.load_state_dict(_albert_state_dict(model))
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


# transformers 5.25 builds flex attention's BlockMask with `create_block_mask(..., _compile=True)`, which torch 2.13
# deprecates, and torch.compile's first run warns from torch's own modules (`torch.jit.script_method`, autograd
# Function instances): calls between transformers and torch, hf_ext not involved.
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")
@torch.no_grad()
@pytest.mark.parametrize(
    "attn_implementation",
    # flex attention compiles once per batch size on CPU: about a minute for the sizes the batch shrinks through
    ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)],
)
def test_q_exit_on_a_shrinking_batch_is_the_same_under_every_attention_implementation(attn_implementation):
    # Regression test: under flex attention, slicing the mask's rows as the batch shrank raised "Cannot use mask_mod
    # from a sliced BlockMask"; the mask is now rebuilt from the remaining rows of the padding mask.
    model = _tiny_palbert(exit_threshold=0.6)
    input_ids, attention_mask, _ = _batch(batch_size=16)
    assert model.config._attn_implementation == "sdpa"  # the default
    expected = model(input_ids, attention_mask=attention_mask)
    assert len(set(expected.exit_step.tolist())) >= 3  # the batch shrinks several times
    model.set_attn_implementation(attn_implementation)
    # torch 2.13's CPU flex-attention kernel, recompiled with a dynamic batch size, indexes out of bounds (ALBERT's
    # own forward too, on a second batch size): compile each size statically instead.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        out = model(input_ids, attention_mask=attention_mask)
    assert out.exit_step.tolist() == expected.exit_step.tolist()
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)


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
    torch.nn.init.zeros_(model.albert.lambda_head.out.weight)
    torch.nn.init.constant_(model.albert.lambda_head.out.bias, 50.0)  # lambda_1 = 1: everyone exits at step 1
    first = model(input_ids, attention_mask=attention_mask, inference_mode=mode)
    assert first.exit_step.tolist() == [1] * 5
    torch.nn.init.constant_(model.albert.lambda_head.out.bias, -50.0)  # lambda_t = 0: everyone runs to the last step
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


@pytest.mark.parametrize(
    "problem_type, num_labels",
    [("regression", 1), ("regression", 3), ("multi_label_classification", 3)],
)
def test_pondering_loss_and_expectation_use_the_problem_types_per_step_loss(problem_type, num_labels):
    # Regression test: float labels of shape (B, num_labels) raised ValueError, `config.problem_type` was ignored.
    model = _tiny_palbert(num_labels=num_labels, problem_type=problem_type)
    input_ids, attention_mask, _ = _batch()
    if problem_type == "regression":
        labels = torch.randn(input_ids.shape[0], num_labels).squeeze(-1)  # (B,) for one label, as ALBERT takes
    else:
        labels = (torch.rand(input_ids.shape[0], num_labels) < 0.5).float()
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    step_logits, lambdas = _reference_steps(model, input_ids, attention_mask)  # (B, L, C)
    p = _plain_exit_probs(lambdas)
    targets = labels.reshape(len(labels), 1, num_labels).expand_as(step_logits)
    if problem_type == "regression":
        per_step = ((step_logits - targets) ** 2).mean(-1)  # (B, L)
    else:
        per_step = -(targets * F.logsigmoid(step_logits) + (1 - targets) * F.logsigmoid(-step_logits)).mean(-1)
    prior = [0.1 * 0.9**k for k in range(NUM_STEPS - 1)] + [0.9 ** (NUM_STEPS - 1)]
    kl = sum(_plain_kl(row, prior) for row in p.tolist()) / len(labels)
    torch.testing.assert_close(out.loss, (p * per_step).sum(-1).mean() + 0.5 * kl, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        expectation = model(input_ids, attention_mask=attention_mask, inference_mode="expectation").logits
        early = model(input_ids, attention_mask=attention_mask)
    if problem_type == "regression":  # sum_t p_t y_t
        torch.testing.assert_close(expectation, (p[..., None] * step_logits).sum(1), atol=1e-5, rtol=1e-5)
    else:  # sigmoid(logits) = sum_t p_t sigmoid(y_t), per label
        mixture = (p[..., None] * step_logits.sigmoid()).sum(1)
        torch.testing.assert_close(expectation.sigmoid(), mixture, atol=1e-5, rtol=1e-5)
    rows = torch.arange(len(labels))
    assert early.logits.shape == (len(labels), num_labels)
    torch.testing.assert_close(early.logits, step_logits[rows, early.exit_step - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "problem_type, num_labels, label_kind, inferred",
    [
        (None, 1, "float", "regression"),
        (None, 3, "long", "single_label_classification"),
        (None, 3, "multi_hot", "multi_label_classification"),
        ("regression", 3, "float", "regression"),
        ("single_label_classification", 3, "long", "single_label_classification"),
        (None, 3, "long_some_ignored", "single_label_classification"),  # -100: CrossEntropyLoss's ignore_index
        ("multi_label_classification", 3, "multi_hot", "multi_label_classification"),
    ],
)
def test_problem_types_give_albert_loss_when_every_example_exits_at_the_last_step(
    problem_type, num_labels, label_kind, inferred
):
    # With p = (0, ..., 0, 1) and beta = 0 the pondering loss is the loss of step L's logits, which are
    # AlbertForSequenceClassification's: the same problem type, inferred from the labels the same way.
    model = _tiny_palbert(num_labels=num_labels, problem_type=problem_type, hidden_dropout_prob=0.0, beta=0.0)
    torch.nn.init.zeros_(model.albert.lambda_head.out.weight)
    torch.nn.init.constant_(model.albert.lambda_head.out.bias, -50.0)  # lambda_t = 0
    albert = AlbertForSequenceClassification(
        _tiny_albert_config(num_labels=num_labels, problem_type=problem_type, initializer_range=0.5)
    ).eval()
    albert.load_state_dict(_albert_state_dict(model))
    input_ids, attention_mask, _ = _batch()
    batch_size = input_ids.shape[0]
    labels = {
        "float": torch.randn(batch_size, num_labels).squeeze(-1),
        "long": torch.randint(0, num_labels, (batch_size,)),
        "long_some_ignored": torch.randint(0, num_labels, (batch_size,)).index_fill(0, torch.tensor([0, 3, 4]), -100),
        "multi_hot": (torch.rand(batch_size, num_labels) < 0.5).float(),
    }[label_kind]
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    expected = albert(input_ids, attention_mask=attention_mask, labels=labels)
    assert model.config.problem_type == albert.config.problem_type == inferred
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.logits, expected.logits)


def test_examples_labelled_minus_100_leave_the_loss_whole():
    # Regression test: an example labelled -100 added 0 to the task term but its KL term to the loss and 1 to the
    # count of the mean. Left out whole, the loss is the loss of the labelled examples alone.
    model = _tiny_palbert()
    input_ids, attention_mask, _ = _batch()
    labels = torch.randint(0, 2, (input_ids.shape[0],))
    ignored = torch.tensor([1, 2, 7])
    kept = torch.tensor([i for i in range(len(labels)) if i not in ignored.tolist()])
    out = model(input_ids, attention_mask=attention_mask, labels=labels.index_fill(0, ignored, -100))
    alone = model(input_ids[kept], attention_mask=attention_mask[kept], labels=labels[kept])
    prior = truncated_geometric_prior(0.1, NUM_STEPS)
    assert (kl_to_prior(out.exit_probs[ignored], prior) > 0.5).all()  # the ignored examples' KL terms are far from 0
    torch.testing.assert_close(out.loss, alone.loss, atol=1e-5, rtol=1e-5)
    # No labelled example at all: NaN, the 0 / 0 of ALBERT's CrossEntropyLoss
    nothing = model(input_ids, attention_mask=attention_mask, labels=torch.full_like(labels, -100))
    assert torch.isnan(nothing.loss)
    assert torch.isnan(F.cross_entropy(nothing.logits, torch.full_like(labels, -100)))


@pytest.mark.parametrize(
    "num_labels, labels, message",
    [
        (2, torch.tensor([0.0, 1.0]),
         r"`labels` must have shape \(2, 2\) for problem_type='multi_label_classification'; "
         r"got shape \(2,\) and dtype torch.float32\."),
        (2, torch.tensor([0, 1, 1]), r"`labels` must be class indices, an integer tensor of shape \(2,\), for "
         r"problem_type='single_label_classification'; got shape \(3,\) and dtype torch.int64\."),
        (1, torch.zeros(2, 2), r"`labels` must have shape \(2,\) for problem_type='regression'; got shape \(2, 2\)"),
    ],
)
def test_bad_labels_raise_before_any_work(num_labels, labels, message):
    model = _tiny_palbert(num_labels=num_labels)
    calls = []
    model.albert.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        model(torch.ones(2, 4, dtype=torch.long), labels=labels)
    assert not calls and model.config.problem_type is None  # nothing ran, the config is left as it was


@pytest.mark.parametrize("model_class", [PalbertModel, PalbertForSequenceClassification])
def test_exactly_one_of_ids_and_embeddings(model_class):
    model = model_class(_tiny_config())
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(torch.ones(2, 4, dtype=torch.long), inputs_embeds=torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model()


# --- outputs per pondering step ----------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("mode", ["q_exit", "full"])
def test_hidden_states_and_attentions_are_albert_ones_per_step(mode):
    # Regression test: `forward(output_hidden_states=True, output_attentions=True)` raised TypeError.
    model = _tiny_palbert()
    model.set_attn_implementation("eager")
    albert = _stock_albert(model)
    albert.set_attn_implementation("eager")
    input_ids, attention_mask, _ = _batch()
    recording = {"output_hidden_states": True, "output_attentions": True}
    recorded = model(input_ids, attention_mask=attention_mask, inference_mode=mode, **recording)
    expected = albert(input_ids, attention_mask=attention_mask, **recording)
    # The embeddings projected to H, then h_t after every step t; the attention weights of every step.
    assert len(recorded.hidden_states) == NUM_STEPS + 1 and len(recorded.attentions) == NUM_STEPS
    assert recorded.attentions[0].shape == (12, 4, input_ids.shape[1], input_ids.shape[1])
    ours, theirs = recorded.hidden_states + recorded.attentions, expected.hidden_states + expected.attentions
    for mine, stock in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, stock)
    # Recording runs every step for every example, with the prediction of the shrinking batch.
    plain = model(input_ids, attention_mask=attention_mask, inference_mode=mode)
    assert recorded.exit_probs is not None and torch.equal(recorded.exit_step, plain.exit_step)
    assert len(set(plain.exit_step.tolist())) >= (3 if mode == "q_exit" else 1)
    torch.testing.assert_close(recorded.logits, plain.logits)
    # The base model: its last hidden state and pooled output are those of each example's exit step.
    base = model.albert(input_ids, attention_mask=attention_mask, inference_mode=mode, output_hidden_states=[0, -1])
    assert base.hidden_states[1:-1] == (None,) * (NUM_STEPS - 1)
    torch.testing.assert_close(base.hidden_states[-1], expected.last_hidden_state)
    rows = torch.arange(input_ids.shape[0])
    at_exit = torch.stack(expected.hidden_states[1:], dim=1)[rows, base.exit_step - 1]  # (B, T, H)
    torch.testing.assert_close(base.last_hidden_state, at_exit)
    torch.testing.assert_close(base.pooler_output, torch.tanh(albert.pooler(at_exit[:, 0])))
    shrinking = model.albert(input_ids, attention_mask=attention_mask, inference_mode=mode)
    torch.testing.assert_close(shrinking.last_hidden_state, at_exit)
    torch.testing.assert_close(shrinking.pooler_output, base.pooler_output)


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


def test_auto_model_loads_the_base_model_from_a_palbert_folder(tmp_path):
    # Regression test: AutoModel.from_pretrained(<palbert folder>) raised "Unrecognized configuration class".
    model = _tiny_palbert()
    model.save_pretrained(tmp_path / "head")
    base = AutoModel.from_pretrained(tmp_path / "head")
    assert type(base) is PalbertModel
    assert base.state_dict().keys() == model.albert.state_dict().keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in model.albert.state_dict().items())
    base.save_pretrained(tmp_path / "base")
    reloaded = AutoModel.from_pretrained(tmp_path / "base")
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        expected = model.albert(input_ids, attention_mask=attention_mask)
        for loaded in (base, reloaded):
            out = loaded(input_ids, attention_mask=attention_mask)
            assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
            assert torch.equal(out.exit_step, expected.exit_step)


def test_checkpoint_with_the_earlier_top_level_lambda_head_loads_whole(tmp_path):
    # Checkpoints saved before the exit head moved under the base model (`lambda_head.*`, now `albert.lambda_head.*`)
    # load through transformers' base-model-prefix handling: nothing missing or unexpected, the same weights.
    from safetensors.torch import load_file, save_file

    model = _tiny_palbert()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    earlier = {key.removeprefix("albert."): v for key, v in load_file(weights).items() if "lambda_head." in key}
    assert earlier and all(key.startswith("lambda_head.") for key in earlier)
    others = {key: v for key, v in load_file(weights).items() if "lambda_head." not in key}
    save_file({**others, **earlier}, weights, metadata={"format": "pt"})
    loaded, info = PalbertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "auto_class, hf_ext_importable",
    [
        ("AutoModelForSequenceClassification", True),
        ("AutoModelForSequenceClassification", False),
        ("AutoModel", False),
    ],
)
def test_remote_code_reload_in_subprocess(auto_class, hf_ext_importable):
    # float64: the tiny model's large init (0.5, for varied exits) amplifies float32 rounding about 70-fold, and the
    # rounding of two processes can differ (allocation-dependent kernel paths), which failed 1 run in 3 at 1.3e-4
    head = _tiny_palbert().double()
    model = head if auto_class == "AutoModelForSequenceClassification" else head.albert
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask)
    outputs, class_name = reload_in_subprocess(
        model, {"input_ids": input_ids, "attention_mask": attention_mask},
        auto_class=auto_class, hf_ext_importable=hf_ext_importable, trust_remote_code=not hf_ext_importable,
    )
    name = type(model).__name__
    if hf_ext_importable:
        assert class_name == f"hf_ext.models.palbert.modeling_palbert.{name}"
    else:
        assert class_name.startswith("transformers_modules.") and class_name.endswith(name)
    for key in ("logits", "last_hidden_state", "pooler_output"):
        if key in expected:
            torch.testing.assert_close(outputs[key], expected[key])
    assert torch.equal(outputs["exit_step"], expected.exit_step)


def _assert_reloads_whole(model, folder, auto_class):
    model.save_pretrained(folder)
    reloaded = auto_class.from_pretrained(folder)
    assert type(reloaded) is type(model) and reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in model.state_dict().items())


def test_from_albert_pretrained_reuses_encoder_and_pooler(tmp_path):
    torch.manual_seed(3)
    albert = AlbertForSequenceClassification(_tiny_albert_config()).eval()
    albert.save_pretrained(tmp_path / "albert")
    albert_state = albert.state_dict()

    model = PalbertForSequenceClassification.from_albert_pretrained(tmp_path / "albert", exit_threshold=0.6)
    assert model.config.model_type == "palbert" and model.config.exit_threshold == 0.6
    assert model.config.hidden_size == albert.config.hidden_size
    state = _albert_state_dict(model)  # under ALBERT's names
    assert state.keys() == albert_state.keys()  # embeddings, shared layer, pooler and the same-shaped classifier
    assert all(torch.equal(state[key], value) for key, value in albert_state.items())
    # Saved, it is a PALBERT checkpoint like any other: it reloads whole, exit head included.
    _assert_reloads_whole(model, tmp_path / "palbert", AutoModelForSequenceClassification)
    # The base model alone, from the same ALBERT checkpoint (its head's weights left out).
    base = PalbertModel.from_albert_pretrained(tmp_path / "albert")
    assert all(torch.equal(base.state_dict()[key.removeprefix("albert.")], value) for key, value in state.items()
               if key.startswith("albert."))
    _assert_reloads_whole(base, tmp_path / "base", AutoModel)

    # As a Hub id (from a local Hub cache), with a new label count: the classifier is new, the rest reused.
    lay_out_as_hub_repo(tmp_path / "albert", "org/tiny-albert", tmp_path / "cache")
    model = PalbertForSequenceClassification.from_albert_pretrained(
        "org/tiny-albert", cache_dir=tmp_path / "cache", local_files_only=True, num_labels=3
    )
    assert model.classifier.weight.shape == (3, albert.config.hidden_size)
    for key, value in albert_state.items():
        if key.startswith("albert."):
            assert torch.equal(_albert_state_dict(model)[key], value), key


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
    assert "albert.lambda_head.out.weight" in changed and "classifier.weight" in changed
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


def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path):
    # `forward(**kwargs)` alone would make Trainer pass `num_items_in_batch` and skip its division of the loss by
    # the accumulation steps; the loss is a batch mean, so the model says it takes no loss kwargs.
    from datasets import Dataset

    input_ids, attention_mask, _ = _batch(batch_size=4)
    data = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": [0, 1, 1, 0]}
    )
    trained = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = _tiny_palbert(hidden_dropout_prob=0.0, classifier_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
            max_grad_norm=0.0,  # clipping would hide a doubled gradient
            use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        trained.append(model.state_dict())
    assert not torch.equal(trained[0]["classifier.weight"], _tiny_palbert().state_dict()["classifier.weight"])
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, atol=1e-5, rtol=1e-4)


def test_docstring_examples():
    import doctest

    from hf_ext.models.palbert import configuration_palbert, modeling_palbert

    for module in (configuration_palbert, modeling_palbert):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module.__name__
