"""Worker for the 2-process TR-DPO test: train a few steps under DDP, save this rank's reference and checks.

Run by tests/trainers/test_trdpo.py with ``torch.distributed.run --nproc_per_node 2``; argv[1] is the output folder.
Besides the reference it saves, per rank, the policy and the plain soft-update recursion
``expected <- alpha * policy + (1 - alpha) * expected`` replayed after every optimizer step.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_ext import TRDPOConfig, TRDPOTrainer
from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2


class ReplaySoftUpdate(TrainerCallback):
    """After each optimizer step (and after the reference callback), replay the soft update in plain fp32."""

    def __init__(self, policy, alpha: float):
        self.policy, self.alpha = policy, alpha
        self.expected = {name: p.detach().clone() for name, p in policy.named_parameters()}

    def on_step_end(self, args, state, control, **kwargs):
        for name, p in self.policy.named_parameters():
            self.expected[name] = self.alpha * p.detach() + (1 - self.alpha) * self.expected[name]


def main(out_dir: str) -> None:
    args = TRDPOConfig(
        os.path.join(out_dir, "run"),
        ref_update="soft",
        alpha=0.5,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        max_length=24,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = TRDPOTrainer(
        tiny_gpt2(), args=args, train_dataset=preference_dataset(32), processing_class=get_tiny_tokenizer()
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    replay = ReplaySoftUpdate(policy, args.alpha)
    trainer.add_callback(replay)
    trainer.train()
    rank = trainer.accelerator.process_index
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    state = {f"reference.{name}": p.detach().contiguous() for name, p in reference.named_parameters()}
    state.update({f"policy.{name}": p.detach().contiguous() for name, p in policy.named_parameters()})
    state.update({f"expected.{name}": t.contiguous() for name, t in replay.expected.items()})
    metadata = {
        "world_size": str(trainer.accelerator.num_processes),
        "distributed_type": str(trainer.args.parallel_mode),
    }
    save_file(state, os.path.join(out_dir, f"reference_rank{rank}.safetensors"), metadata)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
