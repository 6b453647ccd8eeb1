"""Tests for hf_ext.trainers.trdpo: config checks, TRL equivalence, LoRA delta mixing, fp32 masters, resume, DDP."""

import copy
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2
from hf_ext._compat.trl import reference_adapter_name
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

# TRL 1.16's DPO loss reads `model.is_gradient_checkpointing` at every step (trl/models/utils.py,
# `disable_gradient_checkpointing`), which transformers 5.25 deprecates: TRL's code, for DPOTrainer as for ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

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


def test_two_processes_hold_identical_references(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    worker = Path(__file__).with_name("trdpo_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as free:  # a free port for the rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # timed out: end the launcher and its two workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
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
