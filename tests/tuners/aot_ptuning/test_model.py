"""AoTPTuningModel: outputs against a plain reference, collapse, mixed batches, generate, save/load, errors.

PEFT's own common tests on AoT P-Tuning are in test_peft_common.py.
"""

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

import hf_ext  # noqa: F401  (registers the PEFT type)
from hf_ext import AoTPTuningConfig
from hf_ext.testing import tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5
from hf_ext.tuners.aot_ptuning.layer import AoTFCTable, AoTKroneckerTable, AoTPTuningLayer, AoTRawTable

# PEFT 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.25 deprecates
# (FutureWarning): every get_peft_model on a transformers model warns, whatever the method. Not hf_ext's call.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPARAMETRIZATIONS = ["fc", "kronecker", "none"]


def tiny_deberta_v2(seed=0, num_labels=2):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=129, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return DebertaV2ForSequenceClassification(config).eval()


def tiny_bert(seed=0, num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=129, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


BUILDERS = {
    "roberta": (tiny_roberta, "SEQ_CLS"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "deberta_v2": (tiny_deberta_v2, "SEQ_CLS"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "llama": (tiny_llama, "CAUSAL_LM"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
}


def make_peft(arch, reparametrization="fc", seed=0, **config_kwargs):
    """A PEFT model whose AoT weights are random (the zero init would make every bias 0)."""
    build, task_type = BUILDERS[arch]
    config = AoTPTuningConfig(
        task_type=task_type, reparametrization=reparametrization, fc_hidden_size=8, kronecker_rank=3, **config_kwargs
    )
    model = get_peft_model(build(), config)
    randomize_adapter(model, "default", seed)
    return model.eval()


def randomize_adapter(model, adapter_name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name and ("aot_reparam" in name or "modules_to_save" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def random_ids(batch=3, length=7, seed=0):
    return torch.randint(5, 129, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_table(reparam, embedding_weight):
    """P_l [V, d] written out from the working formulas (see the config docstring), independently of the module code."""
    if isinstance(reparam, AoTFCTable):
        return torch.relu(embedding_weight @ reparam.in_weight + reparam.in_bias) @ reparam.out_weight + reparam.out_bias
    if isinstance(reparam, AoTKroneckerTable):
        return torch.kron(reparam.left, reparam.middle)[: reparam.vocab_size] @ reparam.right
    return reparam.table_weight


def reference_forward(peft_model, base_model, input_ids, **kwargs):
    """The base model with `H_l <- H_l + P_l[x]` added by forward pre-hooks, P_l from `reference_table`; in an
    encoder-decoder, ``x`` is `decoder_input_ids` for the decoder's layers."""
    named = [(name, m) for name, m in base_model.named_modules() if isinstance(m, AoTPTuningLayer)]
    layers = [layer for _, layer in named]
    decoder_ids = kwargs.get("decoder_input_ids")
    layer_ids = [decoder_ids if decoder_ids is not None and "decoder." in name else input_ids for name, _ in named]
    embedding_weight = base_model.get_input_embeddings().weight
    tables = [reference_table(layer.aot_reparam["default"], embedding_weight) for layer in layers]
    base_layers = [layer.base_layer for layer in layers]  # the same objects, so unwrap them around the call

    def add_bias(table, ids, module, args, kwargs):
        if args:
            return (args[0] + table[ids],) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + table[ids]}

    handles = [
        base_layer.register_forward_pre_hook(partial(add_bias, table, ids), with_kwargs=True)
        for base_layer, table, ids in zip(base_layers, tables, layer_ids, strict=True)
    ]
    for layer in layers:  # only the AoT layers: a trained head (modules_to_save) stays in use
        layer.enable_adapters(False)
    try:
        return peft_model(input_ids=input_ids, **kwargs)
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("reparametrization", REPARAMETRIZATIONS)
def test_matches_reference_and_collapsed(arch, reparametrization):
    model = make_peft(arch, reparametrization)
    ids = random_ids()
    # an encoder-decoder's decoder layers take the decoder's ids (same shape here, so only the values tell)
    extra = {"decoder_input_ids": random_ids(seed=1)} if arch == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=ids, **extra).logits
        expected = reference_forward(model, model.get_base_model(), ids, **extra).logits
        with model.disable_adapter():
            base = model(input_ids=ids, **extra).logits
        model.base_model.collapse()
        collapsed = model(input_ids=ids, **extra).logits
    assert not torch.allclose(out, base, atol=1e-3)  # the biases do act
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collapsed, out, rtol=1e-5, atol=1e-5)


def test_bfloat16_backbone():
    config = AoTPTuningConfig(task_type="CAUSAL_LM", fc_hidden_size=8)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config)
    randomize_adapter(model, "default", 0)
    model.eval()
    ids = random_ids()
    with torch.no_grad():
        reparametrized = model(input_ids=ids).logits
        model.base_model.collapse()
        collapsed = model(input_ids=ids).logits
    layer = next(m for m in model.modules() if isinstance(m, AoTPTuningLayer))
    assert layer.aot_reparam["default"].collapsed.dtype == torch.bfloat16
    assert layer.aot_reparam["default"].in_weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype=True
    assert collapsed.dtype == torch.bfloat16
    torch.testing.assert_close(collapsed, reparametrized, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_takes_the_base_dtype_without_autocast(dtype):
    # PEFT's contract: adapters are created in the base layer's dtype and upcast to float32 only by
    # autocast_adapter_dtype=True (the default); they stayed float32 either way before.
    def adapter_dtypes(model, adapter_name):
        return {p.dtype for n, p in model.named_parameters() if f"aot_reparam.{adapter_name}." in n}

    config = AoTPTuningConfig(task_type="CAUSAL_LM", fc_hidden_size=8)
    kept = get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=False)
    kept.add_adapter("other", AoTPTuningConfig(task_type="CAUSAL_LM", reparametrization="kronecker"),
                     autocast_adapter_dtype=False)
    assert adapter_dtypes(kept, "default") == adapter_dtypes(kept, "other") == {dtype}
    upcast = get_peft_model(tiny_llama().to(dtype), AoTPTuningConfig(task_type="CAUSAL_LM", fc_hidden_size=8))
    assert adapter_dtypes(upcast, "default") == {torch.float32}


def test_collapse_rules():
    """A collapsed model is for inference: training, or recording gradients for a collapsed adapter, raises;
    the tables are a snapshot, recomputed by an explicit `collapse()`; `uncollapse()` makes it trainable again."""
    model = make_peft("roberta", "fc")
    ids, labels = random_ids(), torch.tensor([0, 1, 1])
    model.train()
    with pytest.raises(ValueError, match=r"`collapse\(\)` is for inference: call `model.eval\(\)` first"):
        model.base_model.collapse()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.base_model.collapse()
    layers = model.base_model._aot_layers()
    assert all(layer.aot_reparam["default"].collapsed is not None for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"'default' is collapsed for inference, but this forward pass records "
                                           r"gradients .* call `uncollapse\(\)` to train"):
        model(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match=r"collapsed for inference \(`collapse\(\)`\); call `uncollapse\(\)` before training"):
        model.train()
    assert not model.base_model.training and not layers[0].training  # refused before any module changed mode

    # a weight changed after collapsing: the snapshot stays until `collapse()` is called again
    with torch.no_grad():
        layers[0].aot_reparam["default"].out_weight.add_(0.1)
        stale = model(input_ids=ids).logits
        model.base_model.collapse()
        recollapsed = model(input_ids=ids).logits
        model.base_model.uncollapse()
        reparametrized = model(input_ids=ids).logits
    torch.testing.assert_close(stale, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(recollapsed, expected, atol=1e-4)
    torch.testing.assert_close(recollapsed, reparametrized, rtol=1e-5, atol=1e-5)

    # uncollapsed: trainable again, and the gradients reach the reparametrization
    assert all(layer.aot_reparam["default"].collapsed is None for layer in layers)
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(layer.aot_reparam["default"].out_weight.grad.abs().sum() > 0 for layer in layers)
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model.base_model.uncollapse(["nope"])


def test_collapsed_frozen_adapter_runs_with_gradients_enabled(tmp_path):
    # As PeftModel.from_pretrained loads it (inference mode, weights frozen): nothing to withhold, no error.
    make_peft("roberta", "kronecker").save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    ids = random_ids()
    expected = model(input_ids=ids).logits
    model.base_model.collapse()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_kronecker_rows_are_rows_of_the_kronecker_product():
    reparam = AoTKroneckerTable(vocab_size=10, rank=3, out_dim=5)
    nn.init.normal_(reparam.right)
    ids = torch.tensor([[0, 3, 9], [4, 4, 7]])
    expected = (torch.kron(reparam.left, reparam.middle) @ reparam.right)[ids]
    torch.testing.assert_close(reparam.rows(ids, None), expected)
    assert reparam.left.shape == (4, 3)  # ceil(sqrt(10)) rows


@pytest.mark.parametrize("reparametrization", REPARAMETRIZATIONS)
def test_trainable_parameter_counts(reparametrization):
    model = get_peft_model(
        tiny_roberta(), AoTPTuningConfig(reparametrization=reparametrization, fc_hidden_size=8, kronecker_rank=3)
    )
    vocab, d, layers = 129, 32, 2
    per_layer = {
        "fc": d * 8 + 8 + 8 * d + d,  # W1, b1, W2, b2 (input embedding dim = d here)
        "kronecker": 2 * math.ceil(math.sqrt(vocab)) * 3 + 3 * 3 * d,  # WL, WM, WR
        "none": vocab * d,
    }[reparametrization]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == layers * per_layer
    assert all(not p.requires_grad for n, p in model.named_parameters() if "aot_reparam" not in n)


def test_initial_adapter_is_identity_and_training_moves_only_adapter_and_head():
    model = get_peft_model(tiny_roberta(), AoTPTuningConfig(task_type="SEQ_CLS", fc_hidden_size=8))
    ids, labels = random_ids(4), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(out, base)  # zero-initialised last factor: starts as the base model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("aot_reparam.default.out_weight" in n for n in changed)
    assert any("modules_to_save.default" in n for n in changed)
    assert all("aot_reparam" in n or "modules_to_save" in n for n in changed)


def two_task_model():
    """A tiny RoBERTa with random "sst2" (FC) and "mnli" (Kronecker) adapters, in eval mode."""
    model = get_peft_model(tiny_roberta(), AoTPTuningConfig(task_type="SEQ_CLS", fc_hidden_size=8), adapter_name="sst2")
    model.add_adapter("mnli", AoTPTuningConfig(task_type="SEQ_CLS", reparametrization="kronecker", kronecker_rank=3))
    randomize_adapter(model, "sst2", 1)
    randomize_adapter(model, "mnli", 2)
    return model.eval()


def _each_example_alone(model, ids, names):
    alone = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone.append(model(input_ids=ids[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            alone.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(alone)


def test_mixed_batch_equals_each_example_alone():
    model = two_task_model()
    ids = random_ids(batch=5)
    names = ["sst2", "mnli", "__base__", "mnli", "sst2"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = _each_example_alone(model, ids, names)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)  # the tasks really differ


def test_collapsed_mixed_batch_equals_each_example_alone():
    model = two_task_model()
    model.add_adapter("qnli", AoTPTuningConfig(task_type="SEQ_CLS", reparametrization="none"))  # a raw table
    randomize_adapter(model, "qnli", 3)
    model.eval()
    ids = random_ids(batch=5)
    names = ["mnli", "sst2", "__base__", "qnli", "mnli"]
    with torch.no_grad():
        reparametrized = model(input_ids=ids, adapter_names=names).logits
        model.base_model.collapse()
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = _each_example_alone(model, ids, names)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed, reparametrized, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("collapsed", [False, True])
def test_mixed_batch_of_base_examples_only_is_the_base_model(collapsed):
    model = get_peft_model(tiny_roberta(), AoTPTuningConfig(task_type="SEQ_CLS", fc_hidden_size=8), adapter_name="sst2")
    randomize_adapter(model, "sst2", 1)
    model.eval()
    if collapsed:
        model.base_model.collapse()
    ids = random_ids(batch=3)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["__base__"] * 3).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, base, rtol=0, atol=0)


def test_mixed_batch_with_grad_enabled_mixes_a_trainable_and_a_collapsed_adapter():
    # "sst2" is active and not collapsed (trainable: its reparametrization runs, with a graph); "mnli" is inactive
    # (frozen) and collapsed, so its table is used. The gathers must not break the graph of the output.
    model = two_task_model()
    model.base_model.collapse(["mnli"])
    ids = random_ids(batch=3)
    names = ["sst2", "mnli", "__base__"]
    logits = model(input_ids=ids, adapter_names=names).logits
    logits.sum().backward()
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(logits.detach(), expected)
    trainable = [p for n, p in model.named_parameters() if "aot_reparam.sst2" in n]
    assert trainable and all(p.grad is not None for p in trainable)


def test_mixed_batch_head_routing_is_undone_after_errors_and_keeps_an_existing_forward():
    model = make_peft("roberta", "fc")
    head = next(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))
    ids = random_ids()
    with pytest.raises(ValueError, match="one adapter per example"):
        model(input_ids=ids, adapter_names=["default"] * 2)
    assert "forward" not in head.__dict__  # the per-call routing was undone by the `finally`
    calls = []

    def instance_forward(*args, **kwargs):  # stands for an instance-level forward such as accelerate's hooks
        calls.append(len(args[0]))
        return type(head).forward(head, *args, **kwargs)

    head.forward = instance_forward
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "__base__", "default"]).logits
        plain = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            disabled_mixed = model(input_ids=ids, adapter_names=["default"] * 3).logits
    assert head.__dict__["forward"] is instance_forward  # put back, not deleted
    # plain, disabled, disabled mixed (PEFT skips the routing when adapters are disabled); the mixed call was routed
    assert calls == [3, 3, 3]
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(disabled_mixed, base)  # disable_adapter() wins over adapter_names, head included


def test_deep_copied_model_takes_its_own_token_ids():
    model = make_peft("roberta", "fc")
    ids_a, ids_b = random_ids(seed=1), random_ids(seed=2)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        expected_b = model(input_ids=ids_b).logits
        expected_a = model(input_ids=ids_a).logits
        got_b = copied(input_ids=ids_b).logits  # the copy's layers read the ids its own hooks captured, not ids_a
        got_a = model(input_ids=ids_a).logits
    torch.testing.assert_close(got_a, expected_a)
    torch.testing.assert_close(got_b, expected_b)
    assert copied.base_model._aot_token_ids[""] is not model.base_model._aot_token_ids[""]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_batch_generate_and_collapsed_tables(num_beams):
    model = make_peft("gpt2", "fc")
    model.add_adapter("other", AoTPTuningConfig(task_type="CAUSAL_LM", reparametrization="none"))
    randomize_adapter(model, "other", 3)
    model.eval()
    model.base_model.collapse()
    ids = random_ids(batch=3, length=4)
    names = ["default", "other", "__base__"]
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams)
    generated = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    alone = []
    for i, name in enumerate(names):
        model.set_adapter("default" if name == "__base__" else name)
        with model.disable_adapter() if name == "__base__" else contextlib.nullcontext():
            alone.append(model.generate(input_ids=ids[i : i + 1], **kwargs))
    assert torch.equal(generated, torch.cat(alone))
    assert len({tuple(row.tolist()) for row in generated[:, 4:]}) == 3  # the adapters generate differently


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_generate_with_cache_equals_without(arch):
    model = make_peft(arch, "kronecker")
    ids = random_ids(batch=2, length=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)
    # every step saw its own token: the last step's scores equal a full forward over the sequence so far (for an
    # encoder-decoder, the decoder's sequence over the encoded prompt)
    so_far = cached.sequences[:, :-1]
    inputs = {"input_ids": ids, "decoder_input_ids": so_far} if arch == "t5" else {"input_ids": so_far}
    with torch.no_grad():
        full = reference_forward(model, model.get_base_model(), **inputs).logits[:, -1]
    torch.testing.assert_close(cached.scores[-1], full, rtol=1e-4, atol=1e-4)


def test_encoder_decoder_layers_are_found_in_both_stacks():
    # Regression: on T5 the layers were not found ("found several"), and with `target_modules` given every forward
    # failed with "did not run the input embedding on `input_ids`" (encoder and decoder embed with their own modules;
    # test_matches_reference_and_collapsed and test_generate_with_cache_equals_without check the outputs).
    model = make_peft("t5", "kronecker")
    assert model.peft_config["default"].target_modules == r"encoder\.block\.\d+|decoder\.block\.\d+"
    layers = [name for name, m in model.get_base_model().named_modules() if isinstance(m, AoTPTuningLayer)]
    assert layers == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_error_when_target_modules_match_a_layer_outside_the_encoder_decoder_stacks():
    config = AoTPTuningConfig(task_type="SEQ_2_SEQ_LM", target_modules=r"encoder\.block\.\d+|lm_head")
    with pytest.raises(ValueError, match=r"matched 'lm_head', which is in neither stack of this encoder-decoder "
                                         r"\(\['encoder', 'decoder'\]\)"):
        get_peft_model(tiny_t5(), config)


@pytest.mark.parametrize("reparametrization", REPARAMETRIZATIONS)
def test_init_weights_false_gives_a_non_identity_adapter(reparametrization):
    # Regression: PEFT's common tests pass `init_weights=False` to get an adapter that changes the outputs.
    ids, outputs = random_ids(), {}
    for init_weights in (True, False):
        config = AoTPTuningConfig(task_type="CAUSAL_LM", reparametrization=reparametrization, fc_hidden_size=8,
                                  kronecker_rank=3, init_weights=init_weights)
        model = get_peft_model(tiny_gpt2(), config).eval()
        with torch.no_grad():
            outputs[init_weights] = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
    torch.testing.assert_close(outputs[True], base, rtol=0, atol=0)  # the default starts as the base model
    assert not torch.allclose(outputs[False], base, atol=1e-3)
    last_factor = {"fc": "out_weight", "kronecker": "right", "none": "table_weight"}[reparametrization]
    values = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(f"default.{last_factor}")])
    assert abs(values.std().item() - 0.02) < 0.003 and abs(values.mean().item()) < 0.003  # N(0, 0.02^2)


@pytest.mark.parametrize("save_collapsed", [False, True])
def test_save_load_round_trip(tmp_path, save_collapsed):
    model = make_peft("roberta", "fc", save_collapsed=save_collapsed)
    ids = random_ids()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    with torch.no_grad():
        if save_collapsed:
            model.base_model.collapse()
        expected = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    layer_keys = [k for k in saved if "aot_reparam" in k]
    if save_collapsed:
        assert saved_config["reparametrization"] == "none"
        assert sorted(k.rsplit(".", 1)[1] for k in layer_keys) == ["table_weight", "table_weight"]
        assert all(saved[k].shape == (129, 32) for k in layer_keys)
        assert isinstance(loaded.base_model.model.roberta.encoder.layer[0].aot_reparam["default"], AoTRawTable)
    else:
        assert saved_config["reparametrization"] == "fc"
        assert len(layer_keys) == 8  # W1, b1, W2, b2 for each of the 2 layers
        own = model.state_dict()
        for key, value in loaded.state_dict().items():
            if "aot_reparam" in key or "modules_to_save" in key:
                assert torch.equal(value, own[key]), key
    assert torch.equal(got, expected)  # bit for bit
    lazily_loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path, low_cpu_mem_usage=True).eval()
    with torch.no_grad():
        assert torch.equal(lazily_loaded(input_ids=ids).logits, expected)


def test_model_card_is_pefts_with_the_aot_tags(tmp_path):
    # One card mechanism per artefact (issue 15): PEFT writes the card; hf_ext's tags reach it through the base
    # model's public `add_model_tags`, also for an adapter loaded with `from_pretrained` and saved again.
    from huggingface_hub import ModelCard

    model = make_peft("roberta", "fc")
    model.base_model.model.config.name_or_path = "org/tiny-roberta"  # as from_pretrained("org/tiny-roberta") sets it
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path / "saved")
    loaded.save_pretrained(tmp_path / "resaved")
    for folder in ("saved", "resaved"):
        card = ModelCard.load(tmp_path / folder / "README.md")
        assert card.data.library_name == "peft"
        assert {"hf-ext", "aot-ptuning", "arxiv:2305.10835", "transformers"} <= set(card.data.tags)
    assert ModelCard.load(tmp_path / "saved" / "README.md").data.base_model == "org/tiny-roberta"
    assert "aot-ptuning" not in (model.unload().model_tags or [])  # the plain base model is no AoT model


@pytest.mark.parametrize(
    "arch, auto_class",
    [
        ("roberta", "AutoModelForSequenceClassification"),
        pytest.param("gpt2", "AutoModelForCausalLM", marks=pytest.mark.slow),
        pytest.param("t5", "AutoModelForSeq2SeqLM", marks=pytest.mark.slow),
    ],
)
def test_reload_in_new_process_after_import_hf_ext(tmp_path, arch, auto_class):
    model = make_peft(arch, "kronecker")
    BUILDERS[arch][0]().save_pretrained(tmp_path / "base")  # the same seed: the base that `model` wraps
    model.save_pretrained(tmp_path / "adapter")
    inputs = {"input_ids": random_ids()}
    if arch == "t5":
        inputs["decoder_input_ids"] = random_ids(seed=1)
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = textwrap.dedent(
        f"""
        import hf_ext, torch, transformers
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        base = transformers.{auto_class}.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        with torch.no_grad():
            save_file({{"logits": model(**inputs).logits}}, {str(tmp_path / "out.safetensors")!r})
        print(type(model.base_model).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "AoTPTuningModel"
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], expected)


class _StackModel(nn.Module):
    """A model whose layers sit in a list with a name AoT does not look for."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(num_hidden_layers=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.stack:
            hidden = layer(hidden)
        return hidden


def test_error_when_layers_not_found():
    with pytest.raises(ValueError, match=r"looked for one outermost `nn.ModuleList` named one of \['layer', 'layers'"):
        get_peft_model(_StackModel(), AoTPTuningConfig())
    # naming the layers works
    model = get_peft_model(_StackModel(), AoTPTuningConfig(target_modules=r"stack\.\d+"))
    assert sum(isinstance(m, AoTPTuningLayer) for m in model.modules()) == 2


def test_error_on_token_ids_outside_the_table():
    model = make_peft("gpt2", "none")
    with pytest.raises(ValueError, match=r"token id 129, outside the AoT P-Tuning tables of 129 rows"):
        model(input_ids=torch.tensor([[3, 129]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(input_ids=torch.tensor([[-1, 3]]))
    # resizing grows the embedding in place; the tables keep 129 rows
    model.get_base_model().resize_token_embeddings(140, mean_resizing=False)
    with pytest.raises(ValueError, match=r"token id 135, outside the AoT P-Tuning tables of 129 rows"):
        model(input_ids=torch.tensor([[3, 135]]))


def test_error_on_vocab_size_mismatch_on_load(tmp_path):
    make_peft("gpt2", "fc").save_pretrained(tmp_path)
    other_vocab = tiny_gpt2(vocab_size=200)
    with pytest.raises(ValueError, match=r"`vocab_size`=129 rows, but the model's input embedding has 200 rows"):
        PeftModel.from_pretrained(other_vocab, tmp_path)


def test_error_without_input_ids():
    model = make_peft("gpt2", "fc")
    embeds = model.get_base_model().get_input_embeddings()(random_ids())
    with pytest.raises(ValueError, match="Pass `input_ids`"):
        model(inputs_embeds=embeds)


def test_errors_on_adapter_names():
    model = make_peft("roberta", "fc")
    ids = random_ids()
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model(input_ids=ids, adapter_names=["default", "nope", "default"])
    with pytest.raises(ValueError, match="one adapter per example: got 2 names for a batch of 3"):
        model(input_ids=ids, adapter_names=["default", "default"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["default"] * 3)


def test_merge_refused_and_unload_restores_base():
    model = make_peft("gpt2", "fc")
    ids = random_ids()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not any(isinstance(m, AoTPTuningLayer) for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=ids).logits, base)
    assert unloaded(inputs_embeds=unloaded.get_input_embeddings()(ids)).logits.shape == base.shape  # hooks removed
