"""Train a DDLM (CDCD-style continuous diffusion LM, arXiv:2305.10818 / 2211.15089) with `transformers.Trainer`.

The data follow run_clm's recipe: C4 text (streamed through `datasets`) tokenized, joined and cut into
blocks of `--seq_length` tokens (DDLM and CDCD use 64). `DDLMModel(input_ids, labels=input_ids)` draws
the noise level from its time warp, the conditioning masks and self-conditioning itself and returns
the loss, so the stock `Trainer` trains it. The time-warp curve gets `--time_warp_lr_multiplier` times
the learning rate (Plaid's CDCD fits its loss CDF at 1e-2). The result is saved as a `DDLMPipeline`
folder (model, scheduler, tokenizer and model card) that `DDLMPipeline.from_pretrained` loads.

    python examples/ddlm_train.py --output_dir ddlm-c4 --max_steps 100000 --bf16        # C4, T5 tokenizer (GPU, Hub)
    python examples/ddlm_train.py --tiny                                                  # offline: built-in corpus, CPU, ~1 min

Every `TrainingArguments` field is a flag. Model sizes and the noise range are flags of their own.
Sizes, step counts and sigma range of the paper are NOT VERIFIED (see PAPERS.md); the defaults are
CDCD's where known and ours otherwise.
"""

import sys
from dataclasses import dataclass, field
from itertools import chain

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, default_data_collator

from hf_ext import DDLMConfig, DDLMModel, DDLMPipeline, DDLMScheduler, save_model_card


@dataclass
class DDLMScriptArguments:
    tiny: bool = field(default=False, metadata={"help": "Offline run on the built-in corpus with a tiny model."})
    dataset_name: str = field(default="allenai/c4", metadata={"help": "Hub dataset with a `text` column."})
    dataset_config: str = field(default="en", metadata={"help": "Dataset configuration."})
    tokenizer_name: str = field(default="google-t5/t5-base", metadata={"help": "Hub tokenizer."})
    seq_length: int = field(default=64, metadata={"help": "Tokens per training block (DDLM/CDCD: 64)."})
    embedding_dim: int = field(default=256, metadata={"help": "Diffusion space size d (CDCD: 256)."})
    hidden_size: int = field(default=1024, metadata={"help": "Transformer width (CDCD: 1024)."})
    num_hidden_layers: int = field(default=8, metadata={"help": "Transformer blocks (CDCD: 8)."})
    num_attention_heads: int = field(default=16, metadata={"help": "Attention heads."})
    sigma_min: float = field(default=1.0, metadata={"help": "Lowest noise level (DDLM: 1, NOT VERIFIED)."})
    sigma_max: float = field(default=10.0, metadata={"help": "Highest noise level (DDLM: 10, NOT VERIFIED)."})
    time_warp_lr_multiplier: float = field(default=10.0, metadata={"help": "Learning-rate factor of the time warp."})


# CDCD trains 1M steps at batch 1024 and lr 1e-4; this is a smaller budget of ours (DDLM's is NOT VERIFIED)
FULL_DEFAULTS = dict(
    output_dir="ddlm-c4", max_steps=100_000, per_device_train_batch_size=64, learning_rate=1e-4, warmup_steps=1000,
    logging_steps=100, save_steps=5000, report_to="none",
)
TINY_DEFAULTS = dict(
    output_dir="ddlm-tiny", max_steps=300, per_device_train_batch_size=64, learning_rate=3e-3, warmup_steps=0,
    logging_steps=50, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
)
TINY_MODEL = dict(seq_length=24, embedding_dim=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def parse_args(argv):
    defaults = {**TINY_DEFAULTS, **TINY_MODEL} if "--tiny" in argv else FULL_DEFAULTS
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    argv = argv + [f"--{key}={value}" for key, value in defaults.items() if key not in given]  # explicit flags win
    return HfArgumentParser((DDLMScriptArguments, TrainingArguments)).parse_args_into_dataclasses(argv)


def load_text_and_tokenizer(script_args):
    """(a `datasets` dataset with a `text` column, tokenizer): C4 from the Hub, or the built-in corpus offline."""
    if script_args.tiny:
        from datasets import Dataset

        from hf_ext.testing import get_tiny_tokenizer, tiny_corpus

        return Dataset.from_dict({"text": tiny_corpus()}), get_tiny_tokenizer()
    from datasets import load_dataset

    dataset = load_dataset(script_args.dataset_name, script_args.dataset_config, split="train", streaming=True)
    return dataset, AutoTokenizer.from_pretrained(script_args.tokenizer_name)


def group_texts(dataset, tokenizer, seq_length):
    """run_clm's packing: tokenize, join documents with EOS, cut into blocks of `seq_length` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def pack(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        blocks = [stream[i: i + seq_length] for i in range(0, len(stream) - seq_length + 1, seq_length)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    columns = ["text"] + [c for c in (dataset.column_names or []) if c != "text"]
    tokenized = dataset.map(tokenize, batched=True, remove_columns=columns)
    return tokenized.map(pack, batched=True, remove_columns=["input_ids"])  # the block count differs from the row count


def main(argv=None) -> int:
    script_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    dataset, tokenizer = load_text_and_tokenizer(script_args)
    train_dataset = group_texts(dataset, tokenizer, script_args.seq_length)

    config = DDLMConfig(
        vocab_size=len(tokenizer), embedding_dim=script_args.embedding_dim, hidden_size=script_args.hidden_size,
        num_hidden_layers=script_args.num_hidden_layers, num_attention_heads=script_args.num_attention_heads,
        intermediate_size=4 * script_args.hidden_size, max_position_embeddings=script_args.seq_length,
        sigma_min=script_args.sigma_min, sigma_max=script_args.sigma_max, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = DDLMModel(config)
    warp = [p for n, p in model.named_parameters() if n.startswith("time_warp.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("time_warp.")]
    lr = training_args.learning_rate
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": lr}, {"params": warp, "lr": lr * script_args.time_warp_lr_multiplier}],
        weight_decay=training_args.weight_decay,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, data_collator=default_data_collator,
        optimizers=(optimizer, None),
    )
    trainer.train()

    scheduler = DDLMScheduler(sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    pipe = DDLMPipeline(model=trainer.model.eval(), scheduler=scheduler, tokenizer=tokenizer)
    pipe.save_pretrained(training_args.output_dir)
    save_model_card(training_args.output_dir, "ddlm", model_name=training_args.output_dir)
    print(f"saved the pipeline to {training_args.output_dir}")

    if script_args.tiny:
        pipe.set_progress_bar_config(disable=True)
        for criterion in (None, "kl"):
            out = pipe(num_samples_per_prompt=3, length=script_args.seq_length, num_inference_steps=100, early_exit=criterion,
                       generator=torch.Generator().manual_seed(0))
            print(f"early_exit={criterion}: steps used {out.steps_used.tolist()}")
            for text in out.texts:
                print("   ", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
