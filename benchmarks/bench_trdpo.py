"""TR-DPO step time: DPO, TR-DPO soft, TR-DPO hard and TRL's `sync_ref_model`, same model and batch, one process.

Each contender trains the same random GPT-2 on the same synthetic pairs (`hf_ext.data.preference_dataset`)
with the same batch; a callback that runs after the reference update times every optimizer step (the
first `--warmup` steps are dropped). TRL's `sync_ref_model` runs in the setting that equals TR-DPO soft
(`ref_model_sync_steps=1`, `ref_model_mixup_alpha=alpha`). Because step times on a shared machine are noisy,
the update alone is also timed in isolation on the trained models (TR-DPO's update includes computing the
logged policy-reference distance). Ratios are against DPO.

    python benchmarks/bench_trdpo.py             # GPT-2 hidden 256, 4 layers, batch 8, length 64, 30 steps
    python benchmarks/bench_trdpo.py --quick     # smoke run
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_tokenizer
from hf_ext.trainers.trdpo import TRDPOConfig, TRDPOTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--tau", type=int, default=10, help="hard-update period (small so that updates happen)")
    parser.add_argument("--update-repeats", type=int, default=20, help="isolated timings of each update")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.warmup, args.update_repeats = 64, 2, 8, 2, 5
    return args


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from its start to after every earlier callback's `on_step_end`."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def build_model(args, tokenizer) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=4,
        n_positions=max(128, args.max_length),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def run(name, args, model, tokenizer, data):
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
        report_to="none",
        max_length=args.max_length,
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=0,
    )
    out = f"/tmp/bench_trdpo/{name}"
    if name == "DPO":
        trainer_cls, config = DPOTrainer, DPOConfig(out, **common)
    elif name == "TRL sync_ref_model":
        trainer_cls = DPOTrainer
        config = DPOConfig(
            out, sync_ref_model=True, ref_model_mixup_alpha=args.alpha, ref_model_sync_steps=1, **common
        )
    elif name == "TR-DPO soft":
        trainer_cls, config = TRDPOTrainer, TRDPOConfig(out, ref_update="soft", alpha=args.alpha, **common)
    else:
        trainer_cls, config = TRDPOTrainer, TRDPOConfig(out, ref_update="hard", tau=args.tau, **common)
    policy = copy.deepcopy(model)
    trainer = trainer_cls(
        policy, ref_model=copy.deepcopy(model), args=config, train_dataset=data, processing_class=tokenizer
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return trainer, statistics.median(timer.times[args.warmup :])


def time_updates(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each update, the updates interleaved so that machine noise hits them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}  # the first round warms up


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = get_tiny_tokenizer()
    model = build_model(args, tokenizer)
    data = preference_dataset(args.steps * args.batch, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 hidden {args.hidden}, {args.layers} layers ({n_params / 1e6:.2f}M parameters), batch {args.batch} pairs, "
        f"max_length {args.max_length}, {args.steps} steps ({args.warmup} warm-up dropped), "
        f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    names = ["DPO", "TR-DPO soft", "TR-DPO hard", "TRL sync_ref_model"]
    trainers, steps = {}, {}
    for name in names:
        trainers[name], steps[name] = run(name, args, model, tokenizer, data)

    # The update alone, on the trained models
    ours = trainers["TR-DPO soft"].ref_callback.reference
    trl = trainers["TRL sync_ref_model"]
    trl_policy, trl_ref = trl.accelerator.unwrap_model(trl.model), trl.ref_model
    update = time_updates(
        {
            "TR-DPO soft": lambda: ours.update(args.alpha, measure=False),
            "TR-DPO soft, logging step": lambda: ours.update(args.alpha),
            "TR-DPO hard": lambda: ours.update(1.0, measure=False),
            "TRL sync_ref_model": lambda: SyncRefModelCallback.sync_target_model(trl_policy, trl_ref, args.alpha),
        },
        args.update_repeats,
    )
    update["TR-DPO hard"] /= args.tau  # one copy every tau steps, amortized per step
    update["DPO"] = 0.0

    base = steps["DPO"]
    print("\n| contender | step (ms, median) | step / DPO | update alone (ms/step) | update / DPO step |")
    print("|---|---|---|---|---|")
    for name in names:
        print(
            f"| {name} | {1e3 * steps[name]:.1f} | {steps[name] / base:.3f} | {1e3 * update[name]:.2f} | "
            f"{100 * update[name] / base:.2f}% |"
        )
    print(
        f"\nTR-DPO soft update vs TRL's: {update['TR-DPO soft'] / update['TRL sync_ref_model']:.2f}x the time; "
        f"on a logging step, which also measures the distance: "
        f"{update['TR-DPO soft, logging step'] / update['TRL sync_ref_model']:.2f}x."
    )


if __name__ == "__main__":
    main()
