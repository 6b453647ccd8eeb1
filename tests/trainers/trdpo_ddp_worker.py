"""Worker for the 2-process TR-DPO test: train a few steps under accelerate/DDP, save this rank's reference.

Run by tests/trainers/test_trdpo.py with ``accelerate launch --cpu --num_processes 2``; argv[1] is the output folder.
"""

import os
import sys

import torch
from safetensors.torch import save_file

from hf_ext import TRDPOConfig, TRDPOTrainer
from hf_ext.data.preference import preference_dataset
from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2


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
        gradient_checkpointing=False,
        report_to="none",
        max_length=24,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = TRDPOTrainer(
        tiny_gpt2(), args=args, train_dataset=preference_dataset(32), processing_class=get_tiny_tokenizer()
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    state = {name: p.detach().contiguous() for name, p in reference.named_parameters()}
    metadata = {
        "world_size": str(trainer.accelerator.num_processes),
        "distributed_type": str(trainer.args.parallel_mode),
    }
    save_file(state, os.path.join(out_dir, f"reference_rank{rank}.safetensors"), metadata)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
