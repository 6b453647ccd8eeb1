"""TR-DPO on Anthropic HH with Pythia: DPO whose reference policy follows the policy (arXiv:2404.09656).

A `TrlParser` script, like TRL's own `dpo.py`: every `TRDPOConfig` / `DPOConfig` / `TrainingArguments`
field and every `ModelConfig` field (`--use_peft`, `--lora_r`, ...) is a flag, and `--config x.yaml` works.
The defaults are the paper's recipe: Pythia 2.8B, Anthropic HH, soft update α = 0.6 (or
`--ref_update hard`, τ = 512), β = 0.05, lr 1e-6, one epoch, max_length 1024, max_grad_norm 2, 100
warm-up steps. TR-IPO is `--loss_type ipo`.

    python examples/trdpo.py                                          # TR-DPO α=0.6, Pythia 2.8B on HH (GPU, Hub)
    accelerate launch examples/trdpo.py --ref_update hard --tau 512   # TR-DPO τ, several GPUs
    python examples/trdpo.py --use_peft --lora_r 16                   # LoRA policy; the reference is a 2nd adapter
    python examples/trdpo.py --tiny                                   # offline: tiny GPT-2, synthetic pairs, CPU

`--tiny` builds a tiny GPT-2, the tiny tokenizer and `hf_ext.data.preference_dataset` in code, scales the
recipe down (40 steps, α = 0.6, τ = 8) and reports the known reward of sampled completions before and
after training. Flags given explicitly still win over these defaults.
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from hf_ext import TRDPOConfig, TRDPOTrainer

PAPER_DEFAULTS = dict(
    model_name_or_path="EleutherAI/pythia-2.8b",
    dataset_name="Anthropic/hh-rlhf",
    output_dir="pythia-2.8b-trdpo-hh",
    ref_update="soft",
    alpha=0.6,
    tau=512,
    beta=0.05,
    learning_rate=1e-6,
    num_train_epochs=1,
    max_length=1024,
    max_grad_norm=2.0,
    warmup_steps=100,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=16,
    logging_steps=10,
)

TINY_DEFAULTS = dict(
    output_dir="trdpo-tiny",
    tau=8,
    beta=0.1,
    learning_rate=1e-3,
    max_steps=40,
    max_length=32,
    max_grad_norm=2.0,
    warmup_steps=0,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    logging_steps=10,
    activation_checkpointing=False,
    bf16=False,
    use_cpu=not torch.cuda.is_available(),
    report_to="none",
    save_strategy="no",
)


@dataclass
class ExampleArguments:
    tiny: bool = field(default=False, metadata={"help": "Offline: tiny GPT-2, the tiny tokenizer, synthetic pairs."})


def make_parser(tiny: bool) -> TrlParser:
    parser = TrlParser((ScriptArguments, TRDPOConfig, ModelConfig, ExampleArguments))
    parser.set_defaults(**PAPER_DEFAULTS)
    if tiny:
        parser.set_defaults(**TINY_DEFAULTS)
    return parser


def load_real(script_args, model_args, training_args):
    """Pythia (by id: the trainer loads it and its reference with `model_init_kwargs`, as TRL's `dpo.py` does) and
    Anthropic HH from the Hub (HH rows are `chosen`/`rejected` dialogues; TRL extracts the prompt)."""
    from datasets import load_dataset

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}  # flags win
    data = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    eval_data = data[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    return model_args.model_name_or_path, None, data[script_args.dataset_train_split], eval_data


def load_tiny(training_args):
    from hf_ext.data.preference import preference_dataset
    from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2

    steps = training_args.max_steps * training_args.per_device_train_batch_size
    return tiny_gpt2(seed=training_args.seed), get_tiny_tokenizer(), preference_dataset(max(steps, 64)), None


@torch.no_grad()
def known_reward(model, tokenizer, num_prompts: int = 64, seed: int = 0) -> float:
    """Mean known reward (`hf_ext.data.preference_reward`) of sampled completions of synthetic prompts."""
    import copy
    import random

    from hf_ext.data.preference import preference_prompt, preference_reward

    left = copy.copy(tokenizer)
    left.padding_side = "left"
    rng = random.Random(seed + 1)
    batch = left([preference_prompt(rng) for _ in range(num_prompts)], return_tensors="pt", padding=True)
    batch = batch.to(model.device)
    torch.manual_seed(seed)
    model.eval()
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(preference_reward(t) for t in texts) / len(texts)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    tiny = "--tiny" in argv
    script_args, training_args, model_args, _ = make_parser(tiny).parse_args_and_config(argv)

    if tiny:
        model, tokenizer, train_data, eval_data = load_tiny(training_args)
        reward_before = known_reward(model, tokenizer, seed=training_args.seed)
    else:
        model, tokenizer, train_data, eval_data = load_real(script_args, model_args, training_args)

    trainer = TRDPOTrainer(
        model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    # TRL's model card: names TR-DPO and cites its paper, tags trl / dpo / tr-dpo (`push_to_hub` writes it too)
    trainer.create_model_card(
        model_name=os.path.basename(training_args.output_dir.rstrip("/")),
        dataset_name=None if tiny else script_args.dataset_name,
    )

    logs = [log for log in trainer.state.log_history if "ref/distance" in log]
    summary = {"steps": trainer.state.global_step, "ref/distance": logs[-1]["ref/distance"] if logs else None}
    if tiny:
        summary["known_reward_before"] = reward_before
        summary["known_reward_after"] = known_reward(trainer.model, tokenizer, seed=training_args.seed)
    print(summary)
    return summary


if __name__ == "__main__":
    main()
