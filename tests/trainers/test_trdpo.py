"""Tests for hf_ext.trainers.trdpo: config checks, construction as DPOTrainer, TRL equivalence, LoRA delta mixing
(parameter-targeted LoRA too), fp32 masters, the model card, resume, DDP."""

import copy
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ext._compat.trl import reference_adapter_name
from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_tokenizer, lay_out_as_hub_repo, tiny_causal_lm, tiny_gpt2, tiny_llama
from hf_ext.trainers.trdpo import (
    REFERENCE_FILE,
    TRDPOConfig,
    TRDPOTrainer,
    _FullReference,
    low_rank_distance_sq,
    mix_group_,
    mix_low_rank,
    pair_parameters,
)

REF_ADAPTER = reference_adapter_name()

# TRL 1.16's DPO loss switches activation checkpointing off around the reference forward at every step
# (trl/models/utils.py, `disable_gradient_checkpointing`) through `model.is_gradient_checkpointing` and
# `gradient_checkpointing_disable/enable`, which transformers 5.25 deprecates: TRL's code, for DPOTrainer as for ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`(is_gradient_checkpointing|gradient_checkpointing_disable|gradient_checkpointing_enable)` is "
    "deprecated:FutureWarning"
)

_COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    bf16=False,
    use_cpu=True,
    activation_checkpointing=False,
    report_to="none",
    max_length=24,
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def _config(tmp_path, cls=TRDPOConfig, **overrides):
    return cls(str(tmp_path), **{**_COMMON, "max_steps": 4, **overrides})


def _trainer(args, model=None, cls=TRDPOTrainer, **kwargs):
    return cls(
        model if model is not None else tiny_gpt2(),
        args=args,
        train_dataset=preference_dataset(32),
        processing_class=get_tiny_tokenizer(),
        **kwargs,
    )


def _params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _assert_same(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"alpha": 0.0}, "`alpha`"),
        ({"alpha": 1.5}, "`alpha`"),
        ({"alpha": -0.2}, "`alpha`"),
        ({"tau": 0}, "`tau`"),
        ({"tau": 2.5}, "`tau`"),
        ({"ref_update": "medium"}, "`ref_update`"),
        ({"ref_adapter_rank": 0}, "`ref_adapter_rank`"),
        ({"sync_ref_model": True}, "`sync_ref_model"),
        ({"precompute_ref_log_probs": True}, "`precompute_ref_log_probs"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_config_fields_documented_and_parsed_by_trlparser(tmp_path):
    from trl import TrlParser

    for name in ("ref_update", "alpha", "tau", "ref_adapter_rank"):
        assert f"{name} (`" in TRDPOConfig.__doc__
    (args,) = TrlParser([TRDPOConfig]).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--ref_update", "hard", "--tau", "8", "--alpha", "0.25", "--use_cpu", "True"]
    )
    assert (args.ref_update, args.tau, args.alpha) == ("hard", 8, 0.25)


def test_config_turns_activation_checkpointing_on_under_its_current_name(tmp_path):
    # DPOConfig's default `gradient_checkpointing=True` warns (deprecated name) on every config; ours does not, and
    # this module runs with FutureWarning as an error.
    args = TRDPOConfig(str(tmp_path), use_cpu=True)
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    assert TRDPOConfig(str(tmp_path), use_cpu=True, activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # the old name still wins
        assert TRDPOConfig(str(tmp_path), use_cpu=True, gradient_checkpointing=False).activation_checkpointing is False


# -------------------------------------------------------------------------------------- construction as DPOTrainer


@pytest.fixture
def hub_model(tmp_path, monkeypatch):
    """A tiny GPT-2 and its tokenizer laid out as the Hub caches `hf-ext-testing/tiny-gpt2`, in a private cache."""
    import huggingface_hub

    folder = tmp_path / "saved"
    tiny_gpt2().save_pretrained(folder)
    get_tiny_tokenizer().save_pretrained(folder)
    cache = tmp_path / "hub-cache"
    lay_out_as_hub_repo(folder, "hf-ext-testing/tiny-gpt2", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return "hf-ext-testing/tiny-gpt2"


def _force_cpu(monkeypatch):
    """What TRL's own tests do on a machine without GPU (tests/conftest.py there): `use_cpu=True` in every config."""
    from trl import DPOConfig

    post_init = DPOConfig.__post_init__

    def on_cpu(self):
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(DPOConfig, "__post_init__", on_cpu)


def test_without_args_builds_the_default_config_as_dpotrainer_does(hub_model, tmp_path, monkeypatch):
    from trl import DPOTrainer

    _force_cpu(monkeypatch)
    monkeypatch.chdir(tmp_path)
    data = preference_dataset(8)
    ours = TRDPOTrainer(hub_model, train_dataset=data)
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # DPOConfig's own default
        theirs = DPOTrainer(hub_model, train_dataset=data)
    assert type(ours.args) is TRDPOConfig
    assert (ours.args.output_dir, theirs.args.output_dir) == ("tiny-gpt2-TRDPO", "tiny-gpt2-DPO")
    ours_dict, theirs_dict = ours.args.to_dict(), theirs.args.to_dict()
    assert {k: ours_dict[k] for k in ("ref_update", "alpha", "tau", "ref_adapter_rank")} == {
        "ref_update": "soft",
        "alpha": 0.6,
        "tau": 512,
        "ref_adapter_rank": None,
    }
    differ = {k for k in theirs_dict if ours_dict[k] != theirs_dict[k]}
    assert differ <= {"output_dir", "logging_dir"}, differ  # every DPOConfig default, checkpointing included
    assert ours.ref_callback in ours.callback_handler.callbacks


def test_model_id_loads_policy_and_reference_like_dpotrainer(hub_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    # model_init_kwargs reach the policy and the reference TRL loads from the same id, as with DPOTrainer
    args = _config(tmp_path, max_steps=3, alpha=0.5, model_init_kwargs={"dtype": torch.bfloat16})
    trainer = TRDPOTrainer(hub_model, args=args, train_dataset=preference_dataset(32))
    checkpoint = load_file(str(next((tmp_path / "hub-cache").rglob("model.safetensors"))))
    assert trainer.model.dtype == trainer.ref_model.dtype == torch.bfloat16
    assert trainer.ref_model is not trainer.model
    for name, param in trainer.ref_model.named_parameters():  # the reference starts as the checkpoint
        assert torch.equal(param, checkpoint[name].to(torch.bfloat16))

    class Replay(TrainerCallback):  # after the reference callback: the soft recursion in fp32
        def __init__(self, policy):
            self.policy = policy
            self.expected = {n: p.detach().float() for n, p in policy.named_parameters()}

        def on_step_end(self, args, state, control, **kwargs):
            for n, p in self.policy.named_parameters():
                self.expected[n] = 0.5 * p.detach().float() + 0.5 * self.expected[n]

    replay = Replay(trainer.model)
    trainer.add_callback(replay)
    trainer.train()
    master = trainer.ref_callback.reference.master  # bf16 reference: the recursion runs on fp32 masters
    for name, param in trainer.ref_model.named_parameters():
        torch.testing.assert_close(master[name], replay.expected[name], rtol=0, atol=1e-6)
        assert torch.equal(param, master[name].to(torch.bfloat16))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(master[name], checkpoint[name].float())  # it moved


def test_model_card_is_trls_with_the_tr_dpo_paper(tmp_path):
    trainer = _trainer(_config(tmp_path, max_steps=1))
    assert {"trl", "dpo", "tr-dpo", "hf-ext"} <= set(trainer.model.model_tags)
    trainer.create_model_card(model_name="tiny-trdpo")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert all(f"- {tag}" in header for tag in ("trl", "dpo", "tr-dpo", "hf-ext"))
    assert "TR-DPO" in card and "https://huggingface.co/papers/2404.09656" in card
    assert "Learn Your Reference Model for Real Good Alignment" in card and "gorbatovski2025learn" in card


# ------------------------------------------------------------------------------------------------- pairing, errors


def test_mismatched_reference_names_and_shapes_raise_before_training(tmp_path):
    args = _config(tmp_path)
    one_layer = tiny_gpt2()
    one_layer.transformer.h = one_layer.transformer.h[:1]
    with pytest.raises(ValueError, match=r"no parameter `transformer\.h\.1\.ln_1\.weight`"):
        _trainer(args, ref_model=one_layer)
    vocab = len(get_tiny_tokenizer())
    with pytest.raises(
        ValueError, match=rf"`transformer\.wte\.weight` has shape \({vocab}, 32\) in the policy but \(200, 32\)"
    ):
        _trainer(args, ref_model=tiny_gpt2(vocab_size=200))
    extra = tiny_gpt2()
    extra.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="parameter `extra` that the policy lacks"):
        pair_parameters(tiny_gpt2(), extra)


def test_peft_policy_with_ref_model_raises(tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="pass `ref_model=None`"):
        _trainer(_config(tmp_path), ref_model=tiny_gpt2(), peft_config=LoraConfig(r=2, target_modules=["c_attn"]))


def test_args_must_be_trdpo_config(tmp_path):
    from trl import DPOConfig

    with pytest.raises(TypeError, match="TRDPOConfig"):
        _trainer(_config(tmp_path, cls=DPOConfig))


# -------------------------------------------------------------------------------- equivalence with TRL's callback


@pytest.mark.parametrize(
    ("ours", "trl", "both"),
    [
        (  # with gradient accumulation: one update per optimizer step, not per micro-batch
            {"ref_update": "soft", "alpha": 0.3},
            {"ref_model_mixup_alpha": 0.3, "ref_model_sync_steps": 1},
            {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        ),
        ({"ref_update": "hard", "tau": 2}, {"ref_model_mixup_alpha": 1.0, "ref_model_sync_steps": 2}, {}),
    ],
    ids=["soft-grad-accum", "hard"],
)
def test_matches_trl_sync_ref_model_where_they_coincide(tmp_path, ours, trl, both):
    from trl import DPOConfig, DPOTrainer

    policy = tiny_gpt2()
    initial = _params(policy)
    trl_trainer = _trainer(
        _config(
            tmp_path / "trl",
            cls=DPOConfig,
            max_steps=5,
            optim="sgd",
            learning_rate=0.5,
            sync_ref_model=True,
            **trl,
            **both,
        ),
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        cls=DPOTrainer,
    )
    trl_trainer.train()
    our_trainer = _trainer(
        _config(tmp_path / "ours", max_steps=5, optim="sgd", learning_rate=0.5, **ours, **both),
        model=copy.deepcopy(policy),
    )
    our_trainer.train()

    our_ref = _params(our_trainer.ref_model)
    if ours["ref_update"] == "hard":  # both copy: bit for bit
        _assert_same(our_ref, _params(trl_trainer.ref_model))
        _assert_same(_params(our_trainer.model), _params(trl_trainer.model))
    else:  # θ_ref + α(θ − θ_ref) vs TRL's (1 − α)θ_ref + αθ: equal up to fp32 rounding (SGD: Adam's
        # normalisation would turn rounding-level gradient differences into lr-sized steps)
        for first, second in (
            (our_ref, _params(trl_trainer.ref_model)),
            (_params(our_trainer.model), _params(trl_trainer.model)),
        ):
            assert first.keys() == second.keys()
            for name in first:
                torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        our_ref["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"]
    )
    distances = [log["ref/distance"] for log in our_trainer.state.log_history if "ref/distance" in log]
    assert len(distances) == (5 if ours["ref_update"] == "soft" else 2)  # one per update


def test_mix_group_matches_trl_formula_to_fp32_rounding_and_copies_exactly():
    torch.manual_seed(0)
    targets, policies = [torch.randn(50, 7), torch.randn(13)], [torch.randn(50, 7), torch.randn(13)]
    expected = [(1 - 0.3) * t + 0.3 * p for t, p in zip(targets, policies, strict=True)]
    distance_sq = sum((p - t).square().sum() for t, p in zip(targets, policies, strict=True))
    got = [t.clone() for t in targets]
    assert mix_group_(got, policies, 0.3).item() == pytest.approx(distance_sq.item(), rel=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    copied = [t.clone() for t in targets]
    mix_group_(copied, policies, 1.0)
    assert all(torch.equal(c, p) for c, p in zip(copied, policies, strict=True))


def test_mix_group_without_measuring_is_the_same_update():
    torch.manual_seed(0)
    targets, policies = [torch.randn(50, 7), torch.randn(13)], [torch.randn(50, 7), torch.randn(13)]
    measured, fused = [t.clone() for t in targets], [t.clone() for t in targets]
    mix_group_(measured, policies, 0.3)
    assert mix_group_(fused, policies, 0.3, measure=False) is None
    for m, f in zip(measured, fused, strict=True):
        torch.testing.assert_close(f, m, rtol=0, atol=1e-6)
    copied = [t.clone() for t in targets]
    assert mix_group_(copied, policies, 1.0, measure=False) is None
    assert all(torch.equal(c, p) for c, p in zip(copied, policies, strict=True))


def test_distance_is_measured_on_logging_steps_only(tmp_path):
    trainer = _trainer(_config(tmp_path, max_steps=4, logging_steps=2, alpha=0.5))
    updates = []
    original = trainer.ref_callback.reference.update

    def spy(alpha, measure=True):
        updates.append(measure)
        return original(alpha, measure)

    trainer.ref_callback.reference.update = spy
    trainer.train()
    assert updates == [False, True, False, True]  # every step updates; steps 2 and 4 log
    logged = [log for log in trainer.state.log_history if "ref/distance" in log]
    assert [log["step"] for log in logged] == [2, 4] and all(log["ref/distance"] > 0 for log in logged)


def test_update_distance_and_formula_on_plain_modules():
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = _params(reference)
    values = _FullReference(policy, reference).update(0.25)
    expected_sq = sum((p.detach() - before[n]).square().sum() for n, p in policy.named_parameters())
    assert values["ref/distance"] == pytest.approx(expected_sq.sqrt().item(), rel=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(
            p.detach(), 0.75 * before[name] + 0.25 * dict(policy.named_parameters())[name].detach()
        )


# ----------------------------------------------------------------------------------------------------- fp32 master


def test_bf16_reference_keeps_small_alpha_steps_in_an_fp32_master():
    policy = torch.nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.fill_(1.5)
        policy.bias.fill_(-1.0)
    reference = torch.nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.fill_(1.0)
        reference.bias.fill_(0.0)
    naive = copy.deepcopy(reference)
    state, alpha, expected = _FullReference(policy, reference), 1e-3, torch.tensor(1.0)
    for _ in range(50):
        state.update(alpha)
        with torch.no_grad():  # TRL's SyncRefModelCallback update, in the stored dtype (bf16)
            for target, source in zip(naive.parameters(), policy.parameters(), strict=True):
                target.mul_(1.0 - alpha).add_(source, alpha=alpha)
        expected = (1 - alpha) * expected + alpha * 1.5  # plain fp32 recursion
    # bf16 spacing at 1.0 is 2^-7 = 0.0078, each step moves by 5e-4: rounded away without the master
    assert torch.equal(naive.weight, torch.ones_like(naive.weight, dtype=torch.bfloat16))
    master = state.master["weight"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, torch.full_like(master, expected.item()), rtol=0, atol=1e-6)
    assert torch.equal(reference.weight, master.to(torch.bfloat16))
    assert reference.weight[0, 0].item() > 1.0


# ------------------------------------------------------------------------------------------------------------ LoRA


def test_mix_low_rank_is_exact_or_optimal_against_the_dense_value():
    torch.manual_seed(0)
    factors = [(torch.randn(12, 2), torch.randn(2, 9), 0.6), (torch.randn(12, 3), torch.randn(3, 9), 0.4)]
    dense = sum(c * b @ a for b, a, c in factors)
    b, a, error = mix_low_rank(factors, rank=5)  # rank(dense) <= 5: exact
    torch.testing.assert_close(b @ a, dense, rtol=0, atol=1e-5)
    assert error == pytest.approx(0.0, abs=1e-6)
    b, a, error = mix_low_rank(factors, rank=2)  # truncated: the Eckart-Young optimum
    s = torch.linalg.svdvals(dense)
    optimal = s[2:].square().sum().sqrt()
    assert torch.linalg.matrix_norm(dense - b @ a).item() == pytest.approx(optimal.item(), rel=1e-4)
    assert error == pytest.approx((optimal / s.square().sum().sqrt()).item(), rel=1e-4)
    assert low_rank_distance_sq(factors[0], (b, a, 1.0)).item() == pytest.approx(
        torch.linalg.matrix_norm(0.6 * factors[0][0] @ factors[0][1] - b @ a).square().item(), rel=1e-4
    )


def _lora_trainer(tmp_path, **overrides):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.1)
    return _trainer(_config(tmp_path, **overrides), peft_config=lora)


def test_lora_soft_update_mixes_weight_deltas_exactly(tmp_path):
    from transformers import TrainerCallback

    trainer = _lora_trainer(tmp_path, max_steps=3, ref_update="soft", alpha=0.5, ref_adapter_rank=8)
    layer = trainer.model.base_model.model.transformer.h[0].attn.c_attn
    assert torch.count_nonzero(layer.get_delta_weight(REF_ADAPTER)) == 0  # starts as the policy: ΔW = 0

    class RecordDense(TrainerCallback):  # added after the reference callback: sees the updated reference
        def __init__(self):
            self.exact, self.factorwise, self.reference = torch.zeros_like(layer.get_delta_weight("default")), None, []

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                self.exact = 0.5 * layer.get_delta_weight("default") + 0.5 * self.exact  # dense exact recursion
                self.reference.append((layer.get_delta_weight(REF_ADAPTER).clone(), self.exact.clone()))

    record = RecordDense()
    trainer.add_callback(record)
    trainer.train()
    for got, exact in record.reference:  # rank(mix) <= 2 * (steps + 1) <= 8: exact up to fp32 rounding
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
    # a factor-wise average of A and B is not the average of the deltas
    policy_a, policy_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.linalg.matrix_norm(record.exact).item() > 0
    assert not torch.allclose(layer.get_delta_weight(REF_ADAPTER), layer.get_delta_weight("default"), atol=1e-6)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if f".{REF_ADAPTER}." in n)
    # the reference adapter is deterministic even though the policy's LoraConfig has dropout 0.1
    assert isinstance(layer.lora_dropout[REF_ADAPTER], torch.nn.Identity)
    assert policy_a.requires_grad and policy_b.requires_grad


def test_lora_hard_update_copies_the_delta_and_truncation_is_logged(tmp_path):
    trainer = _lora_trainer(tmp_path, max_steps=4, ref_update="hard", tau=2)
    trainer.train()
    layer = trainer.model.base_model.model.transformer.h[1].mlp.c_fc
    torch.testing.assert_close(
        layer.get_delta_weight(REF_ADAPTER), layer.get_delta_weight("default"), rtol=0, atol=1e-6
    )
    assert layer.lora_A[REF_ADAPTER].weight.shape[0] == 2  # rank of the policy for hard updates
    logs = [log for log in trainer.state.log_history if "ref/distance" in log]
    assert len(logs) == 2 and all(log["ref/truncation_error"] < 1e-5 for log in logs)


def test_lora_on_moe_expert_parameters_mixes_each_experts_delta(tmp_path):
    # LoraConfig(target_parameters=...) adapts the 3-d expert weights (E, ., .): PEFT's ParamWrapper stacks the
    # experts' factors in one pair of linears. The reference must mix each expert's delta, exactly.
    from peft import LoraConfig
    from peft.tuners.lora import ParamWrapper
    from transformers import TrainerCallback

    lora = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    trainer = _trainer(
        _config(tmp_path, max_steps=3, alpha=0.5, ref_adapter_rank=8, learning_rate=0.1),
        model=tiny_causal_lm("gpt_oss"),
        peft_config=lora,
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, ParamWrapper)]  # 2 layers x 2 nested wrappers
    assert len(layers) == 4 and all(layer.num_experts == 4 for layer in layers)

    class RecordDense(TrainerCallback):  # after the reference callback: the dense recursion per expert
        def __init__(self):
            self.exact = [torch.zeros_like(layer.get_delta_weight("default")) for layer in layers]
            self.pairs = []

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    self.exact[i] = 0.5 * layer.get_delta_weight("default") + 0.5 * self.exact[i]
                    self.pairs.append((layer.get_delta_weight(REF_ADAPTER).clone(), self.exact[i].clone()))

    record = RecordDense()
    trainer.add_callback(record)
    trainer.train()
    assert len(record.pairs) == 3 * len(layers)
    for got, exact in record.pairs:  # (E, ., .) deltas; rank of each expert's mix <= 2 * (steps + 1) <= 8: exact
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
    assert all(torch.linalg.matrix_norm(exact).min() > 0 for exact in record.exact)  # every expert moved


def test_lora_whose_delta_is_not_b_times_a_is_refused():
    from peft import LoraConfig, get_peft_model

    from hf_ext.trainers.trdpo import _LoraReference

    dora = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    with pytest.raises(ValueError, match="`use_dora=True`: its delta is not B·A·s"):
        _LoraReference(dora, None, "soft")

    class GroupedConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    with pytest.warns(UserWarning, match="groups > 1"):  # PEFT's own warning: such an adapter cannot be merged
        grouped = get_peft_model(GroupedConv(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match=r"LoRA layer `base_model\.model\.conv` adapts a convolution with groups=2"):
        _LoraReference(grouped, None, "soft")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_reference_adapter_leaves_the_base_weights_of_a_pissa_or_olora_policy_alone(init):
    # Regression: the reference adapter copied the policy's `init_lora_weights`, and PiSSA / OLoRA initialisation
    # rewrites the base weights (W - B A s) that the policy shares, which changed the policy's outputs.
    from peft import LoraConfig, get_peft_model

    from hf_ext.trainers.trdpo import _LoraReference

    policy = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    ids = torch.randint(5, 100, (2, 7))
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        before = policy(input_ids=ids).logits
    _LoraReference(policy, None, "soft")
    _assert_same({n: p.detach() for n, p in policy.named_parameters() if "base_layer" in n}, base)
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, before)
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.get_delta_weight(REF_ADAPTER), layer.get_delta_weight("default"), rtol=0, atol=1e-6)


def test_trl_loss_takes_the_reference_log_probs_from_the_moving_adapter(tmp_path):
    # hf_ext._compat.trl.reference_adapter_name: DPOTrainer's loss runs the reference forward in that adapter
    trainer = _lora_trainer(tmp_path, max_steps=2, ref_update="soft", alpha=0.5, learning_rate=0.1)
    trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))
    moved = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        for module in trainer.model.modules():
            if hasattr(module, "lora_B") and REF_ADAPTER in module.lora_B:
                module.lora_B[REF_ADAPTER].weight.zero_()  # reference adapter switched off: the base model
    base = trainer.compute_ref_log_probs(trainer.model, batch)
    for m, b in zip(moved, base, strict=True):
        assert not torch.allclose(m, b, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_equals_straight_run(tmp_path, lora):
    def make(out, **kw):
        if lora:
            return _lora_trainer(out, max_steps=4, save_strategy="steps", save_steps=2, alpha=0.5, **kw)
        return _trainer(_config(out, max_steps=4, save_strategy="steps", save_steps=2, alpha=0.5, **kw))

    def reference_of(trainer):
        if lora:
            return {k: v for k, v in _params(trainer.model).items() if f".{REF_ADAPTER}." in k}
        return _params(trainer.ref_model)

    straight = make(tmp_path / "straight")
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / REFERENCE_FILE).is_file()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_same(_params(resumed.model), _params(straight.model))
    _assert_same(reference_of(resumed), reference_of(straight))
    assert resumed.ref_callback.reference.master.keys() == straight.ref_callback.reference.master.keys()


def test_resume_without_saved_reference_raises(tmp_path):
    straight = _trainer(_config(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2))
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    os.remove(checkpoint / REFERENCE_FILE)
    with pytest.raises(ValueError, match=REFERENCE_FILE):
        _trainer(_config(tmp_path / "b", max_steps=4)).train(resume_from_checkpoint=str(checkpoint))


# ----------------------------------------------------------------------------------------------------- distributed


def _run_two_processes(worker: str, *args: str, timeout: float = 240) -> None:
    """Run ``worker`` under ``torch.distributed.run`` with 2 processes on this machine (gloo); fail with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (it falls back to gloo)
    with socket.socket() as free:  # a free port for the rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), str(Path(__file__).with_name(worker)), *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: end the launcher and its two workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]


@pytest.mark.slow
def test_two_processes_hold_identical_references(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    _run_two_processes("trdpo_ddp_worker.py", str(tmp_path))
    files = [tmp_path / f"reference_rank{rank}.safetensors" for rank in (0, 1)]
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["world_size"] == "2"
    first, second = (load_file(str(f)) for f in files)
    _assert_same(first, second)  # references (and policies) identical on both ranks
    reference = {k: v for k, v in first.items() if k.startswith("reference.")}
    for key, value in reference.items():  # the reference is the soft recursion over the synced policies
        torch.testing.assert_close(value, first[key.replace("reference.", "expected.", 1)], rtol=0, atol=1e-6)
    initial = _params(tiny_gpt2())
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(first[f"reference.{name}"], initial[name])
    assert not torch.equal(first[f"reference.{name}"], first[f"policy.{name}"])  # alpha < 1: it lags the policy


def _needs(backend: str):
    if backend == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (`pip install deepspeed` runs this test)")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_reference_follows_the_soft_recursion(tmp_path, backend, kind):
    # 2 processes, both models sharded as accelerate / TRL shard them (see trdpo_sharded_worker.py for why not
    # through TRDPOTrainer on a CPU): after 3 steps the reference equals the single-process soft recursion replayed
    # on the gathered policy, every rank logs the same distance, and the checkpoint file restores it bit for bit.
    import json

    _needs(backend)
    _run_two_processes("trdpo_sharded_worker.py", backend, kind, str(tmp_path))
    results = [json.loads((tmp_path / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1], results
    result = results[0]
    assert result["world_size"] == 2 and result["round_trip"]
    assert result["max_error"] < 1e-6  # fp32 rounding of the mix
    assert result["max_lag"] > 1e-4  # α < 1: the reference lags the policy, so the comparison is not vacuous
    assert result["distances"][:2] == [None, None] and result["distances"][2] > 0  # measured on the logging step


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_update_gathers_at_most_one_pair(tmp_path, backend):
    # Peak RSS of each process during the reference update of a ~38M-parameter GPT-2 (145 MiB in fp32): FSDP2
    # updates local shards (no gather), ZeRO-3 gathers one parameter pair at a time (largest: 2 x 4 MiB). Seen here:
    # a rise of <= 0.3 MiB (FSDP2) and <= 36 MiB (ZeRO-3, with DeepSpeed's buffers), against ~200 MiB for gathering
    # both whole models at once as TRL's SyncRefModelCallback does under ZeRO-3 (BENCHMARKS.md).
    import json

    _needs(backend)
    _run_two_processes("trdpo_sharded_worker.py", backend, "memory", str(tmp_path))
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"memory_rank{rank}.json").read_text())
        print(backend, rank, figures)  # the figures BENCHMARKS.md records
        assert figures["measured_update"] < 0.5 * figures["model_mib"], figures  # not even one whole model
        assert figures["fused_update"] < 0.5 * figures["model_mib"], figures
