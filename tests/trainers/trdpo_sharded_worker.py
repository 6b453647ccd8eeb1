"""Worker for the 2-process sharded TR-DPO tests (FSDP2 over gloo, DeepSpeed ZeRO-3 on the CPU).

Run by tests/trainers/test_trdpo.py with ``torch.distributed.run --nproc_per_node 2``;
argv: ``backend`` (``fsdp2`` | ``zero3``), ``kind`` (``full`` | ``lora`` | ``memory``), output folder.

accelerate (1.16) enables FSDP and DeepSpeed only on accelerator devices (GPU, XPU, ...): on a CPU-only machine
`TRDPOTrainer` cannot be launched under either. So this worker shards the models the way the trainer's stack does
— FSDP2: `fully_shard` on each transformer block then the root for the policy (accelerate's auto-wrap), the root
alone for the reference (TRL's `prepare_fsdp`); ZeRO-3: `deepspeed.initialize` for both (accelerate, and TRL's
`prepare_deepspeed` for the reference) — and drives TR-DPO's own `TRDPOReferenceCallback` through
`on_train_begin` / `on_step_end` / `save` / `load` around plain optimizer steps.

- ``full`` / ``lora``: after 3 steps the reference (gathered) is compared with the soft recursion
  ``expected <- α·θ + (1 − α)·expected`` replayed on the gathered policy (for LoRA on the dense ΔW), and a
  save / load round trip must restore it bit for bit. Writes ``result_rank<r>.json``.
- ``memory``: a 12-layer GPT-2 (hidden 512, ~38M parameters); the rise of each process's peak RSS while the
  reference is updated (measured and fused updates), from the kernel's high-water mark reset just before, against
  the size of one full model and against gathering both whole models at once (what TRL's `SyncRefModelCallback`
  does under ZeRO-3). Writes ``memory_rank<r>.json``.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from hf_ext.testing import tiny_gpt2
from hf_ext.trainers.trdpo import TRDPOReferenceCallback, _FullReference, _LoraReference

ALPHA, STEPS = 0.5, 3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _gathered_copy(params: dict[str, torch.Tensor], zero3: bool) -> dict[str, torch.Tensor]:
    """Whole fp32 copies of ``params`` on every rank (the test's own gathers: small models only)."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().float().clone() for name, p in params.items()}
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
        for name, p in params.items()
    }


@torch.no_grad()
def _zero(params: list[torch.Tensor], zero3: bool) -> None:
    """Zero whole parameters (a ZeRO-3 parameter is written through a gather, as any write must be)."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for p in params:
                p.data.zero_()
    else:
        for p in params:
            p.data.zero_()  # an FSDP2 parameter: this rank's shard


def _shard(policy, reference, zero3: bool, blocks):
    """Shard as the trainer's stack would; returns (step function, policy module, reference module)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if zero3:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(trainable, lr=0.05), config=config)
        if reference is not None:
            deepspeed.initialize(
                model=reference, config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
            )

        def step(batch):
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            engine.step()

        return step
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(policy)
    if reference is not None:
        fully_shard(reference)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05)

    def step(batch):
        policy(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _lora_deltas(model, adapter_scalings: dict[str, float], zero3: bool) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A of each adapter of each LoRA layer, from gathered factors."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter in adapter_scalings:
                factors[f"{name}|{adapter}|B"] = layer.lora_B[adapter].weight
                factors[f"{name}|{adapter}|A"] = layer.lora_A[adapter].weight
    whole = _gathered_copy(factors, zero3)
    return {
        key[:-2]: scale * whole[key] @ whole[key[:-1] + "A"]
        for key in whole
        if key.endswith("|B")
        for adapter, scale in adapter_scalings.items()
        if f"|{adapter}|" in key
    }


def run(backend: str, kind: str, out_dir: str) -> None:
    zero3 = backend == "zero3"
    rank = dist.get_rank()
    torch.manual_seed(0)
    callback_args = SimpleNamespace()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            tiny_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        )
        reference = None
        state = _LoraReference(policy, rank=8, ref_update="soft", zero3=zero3)  # before sharding, as in the trainer
        blocks = policy.base_model.model.transformer.h
    else:
        sizes = dict(n_embd=512, n_layer=12, n_head=8) if kind == "memory" else {}
        policy, reference = tiny_gpt2(**sizes).train(), tiny_gpt2(**sizes)
        state = _FullReference(policy, reference, zero3=zero3)
        blocks = policy.transformer.h
    step = _shard(policy, reference, zero3, blocks)
    callback = TRDPOReferenceCallback(state, "soft", ALPHA, tau=1)
    callback.on_train_begin(callback_args, None, None)
    batch = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(rank))

    if kind == "memory":
        step(batch)
        callback.on_step_end(callback_args, SimpleNamespace(global_step=1), SimpleNamespace(should_log=True))
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in policy.parameters())
        figures = {"model_mib": numel * 4 / 2**20, "rss_before_mib": _rss_kib("VmRSS") / 1024}
        for should_log in (True, False):
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
            rss_before = _rss_kib("VmRSS")
            callback.on_step_end(callback_args, SimpleNamespace(global_step=2), SimpleNamespace(should_log=should_log))
            figures["measured_update" if should_log else "fused_update"] = (_rss_kib("VmHWM") - rss_before) / 1024
        # For scale: what gathering both whole models at once costs (TRL's SyncRefModelCallback under ZeRO-3 gathers
        # `list(model.parameters()) + list(target_model.parameters())` in one GatheredParameters)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        rss_before = _rss_kib("VmRSS")
        both = list(policy.parameters()) + list(reference.parameters())
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(both):
                pass
        else:
            whole = [p.full_tensor() for p in both]
            del whole
        figures["gather_both_models"] = (_rss_kib("VmHWM") - rss_before) / 1024
        figures["process_peak_rss_mib"] = _rss_kib("VmHWM") / 1024
        with open(os.path.join(out_dir, f"memory_rank{rank}.json"), "w") as f:
            json.dump(figures, f)
        return

    if kind == "lora":
        scaling = {"default": 2.0}  # lora_alpha / r
        expected = {k.replace("|default", "|ref"): v for k, v in _lora_deltas(policy, scaling, zero3).items()}
    else:
        expected = _gathered_copy(dict(policy.named_parameters()), zero3)
    distances = []
    for global_step in range(1, STEPS + 1):
        step(batch)
        control = SimpleNamespace(should_log=global_step == STEPS)
        callback.on_step_end(callback_args, SimpleNamespace(global_step=global_step), control)
        distances.append(callback.pop_metrics().get("ref/distance"))
        if kind == "lora":
            policy_now = _lora_deltas(policy, scaling, zero3)
            expected = {
                k: ALPHA * policy_now[k.replace("|ref", "|default")] + (1 - ALPHA) * v for k, v in expected.items()
            }
        else:
            policy_now = _gathered_copy(dict(policy.named_parameters()), zero3)
            expected = {k: ALPHA * policy_now[k] + (1 - ALPHA) * v for k, v in expected.items()}
    if kind == "lora":
        got = _lora_deltas(policy, {"ref": 1.0}, zero3)
    else:
        got = _gathered_copy(dict(reference.named_parameters()), zero3)
    error = max((got[k] - expected[k]).abs().max().item() for k in expected)
    moved = max(
        (got[k] - (policy_now[k.replace("|ref", "|default")] if kind == "lora" else policy_now[k])).abs().max().item()
        for k in expected
    )

    # save / load round trip through the checkpoint file
    folder = os.path.join(out_dir, "checkpoint")
    os.makedirs(folder, exist_ok=True)
    callback.save(folder, write=rank == 0)
    dist.barrier()
    params = dict(policy.named_parameters()) if kind == "lora" else dict(reference.named_parameters())
    targets = {n: p for n, p in params.items() if kind != "lora" or ".ref." in n}
    _zero(list(targets.values()), zero3)
    callback.load(folder)
    reloaded = _lora_deltas(policy, {"ref": 1.0}, zero3) if kind == "lora" else _gathered_copy(targets, zero3)
    round_trip = all(torch.equal(reloaded[k], got[k]) for k in got)
    with open(os.path.join(out_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(
            {
                "max_error": error,
                "max_lag": moved,
                "round_trip": round_trip,
                "distances": distances,
                "world_size": dist.get_world_size(),
            },
            f,
        )


def main(backend: str, kind: str, out_dir: str) -> None:
    if backend == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    try:
        run(backend, kind, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
