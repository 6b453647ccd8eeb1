"""Fine-tune ALBERT as PALBERT on a GLUE task with `Trainer`, then serve it with per-example early exit.

PALBERT (arXiv 2204.03276) reads one shared classifier after every application of ALBERT's shared layer and
learns when to stop (PonderNet loss, revisited exit head); at inference the Q-exit rule stops each example at
the first step whose cumulative exit probability exceeds q = 0.5. The script initialises PALBERT from an ALBERT
checkpoint (`PalbertForSequenceClassification.from_albert_pretrained`), trains, reports accuracy (Pearson and
Spearman for STS-B) and the mean exit step, times full depth against Q-exit on the evaluation set, and saves
the model with its model card (it reloads with `AutoModelForSequenceClassification`).

    python examples/palbert_glue.py                      # albert-base-v2 on RTE, the paper's settings (Hub, GPU)
    python examples/palbert_glue.py --task stsb          # regression: MSE per step
    python examples/palbert_glue.py --tiny               # offline: tiny ALBERT, synthetic task (~1 min)

Paper settings (tinkoff-ai/palbert README): lr 1e-5 (exit head too), batch 32, max length 128, Adam without a
scheduler, hidden and attention dropout 0, up to 25 epochs with patience 5, fp16, beta = 0.5, lambda_p = 0.1,
revisited exit head with 3 layers. The reference code also adds a layer-position embedding to the exit head's
input; this implementation does not.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
)

from hf_ext import PalbertForSequenceClassification, save_model_card
from hf_ext.data.glue import GLUE_TASKS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="albert/albert-base-v2", help="an ALBERT checkpoint (Hub id or folder)")
    parser.add_argument("--task", default="rte", choices=sorted(GLUE_TASKS))
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=25)
    parser.add_argument("--patience", type=int, default=5, help="epochs without improvement before stopping")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.5, help="weight of KL(p || p_G)")
    parser.add_argument("--prior-lambda", type=float, default=0.1, help="lambda_p of the geometric prior")
    parser.add_argument("--exit-threshold", type=float, default=0.5, help="q of the Q-exit rule")
    parser.add_argument("--out", default="palbert_glue_out", help="folder for the model and results.json")
    parser.add_argument("--tiny", action="store_true", help="offline: tiny random ALBERT and a synthetic task")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def palbert_settings(args, num_labels: int) -> dict:
    return dict(
        num_labels=num_labels, beta=args.beta, prior_lambda=args.prior_lambda, exit_threshold=args.exit_threshold,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def load_real(args):
    """PALBERT from the ALBERT checkpoint, its tokenizer, and the GLUE task tokenized."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    columns, num_labels, eval_split = GLUE_TASKS[args.task]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("nyu-mll/glue", args.task)

    def tokenize(batch):
        return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=args.max_length)

    model = PalbertForSequenceClassification.from_albert_pretrained(args.model, **palbert_settings(args, num_labels))
    return model, tokenizer, data["train"].map(tokenize, batched=True), data[eval_split].map(tokenize, batched=True)


def load_tiny(args, folder: Path):
    """A tiny random ALBERT saved to `folder` (standing in for a Hub checkpoint) and the difficulty task."""
    from hf_ext.data.difficulty import difficulty_dataset
    from hf_ext.testing import get_tiny_tokenizer, tiny_albert

    tokenizer = get_tiny_tokenizer()
    tiny_albert(seed=args.seed, tokenizer=tokenizer).save_pretrained(folder)  # 4 shared-layer steps

    def tokenize(batch):  # the tiny tokenizer adds no [CLS]; its bos token takes that place
        return tokenizer([f"{tokenizer.bos_token} {t}" for t in batch["text"]])

    train = difficulty_dataset(2000, seed=args.seed, num_polar=7).map(tokenize, batched=True)
    evaluation = difficulty_dataset(500, seed=args.seed + 1, num_polar=7).map(tokenize, batched=True)
    settings = {**palbert_settings(args, 2), "prior_lambda": 0.5}  # L = 4 here; lambda_p = 0.1 would favour step 4
    model = PalbertForSequenceClassification.from_albert_pretrained(folder, **settings)
    return model, tokenizer, train, evaluation


def make_compute_metrics(num_labels: int, num_steps: int):
    def compute_metrics(eval_pred):
        logits, exit_step = eval_pred.predictions[0], eval_pred.predictions[1]
        labels = eval_pred.label_ids
        metrics = {"mean_exit_step": float(exit_step.mean()), "ideal_speedup": num_steps / float(exit_step.mean())}
        if num_labels == 1:
            from scipy.stats import pearsonr, spearmanr

            metrics["pearson"] = float(pearsonr(logits[:, 0], labels)[0])
            metrics["spearman"] = float(spearmanr(logits[:, 0], labels)[0])
        else:
            metrics["accuracy"] = float((logits.argmax(-1) == labels).mean())
        return metrics

    return compute_metrics


@torch.no_grad()
def time_inference(model, collator, evaluation, batch_size: int) -> dict:
    """Wall time of the evaluation set at full depth and with Q-exit (no labels: exited examples leave the batch)."""
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in evaluation.column_names]
    rows = evaluation.select_columns(columns).to_list()
    batches = [collator(rows[i : i + batch_size]).to(model.device) for i in range(0, len(rows), batch_size)]
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    model.eval()
    seconds = {}
    for mode in ("full", "q_exit"):
        model(**batches[0], inference_mode=mode)  # warm-up, so that the first mode timed pays no set-up
        synchronize()
        start = time.perf_counter()
        for batch in batches:
            model(**batch, inference_mode=mode)
        synchronize()  # GPU calls return before the work is done
        seconds[mode] = time.perf_counter() - start
    speedup = seconds["full"] / seconds["q_exit"]
    return {"full_depth_s": seconds["full"], "q_exit_s": seconds["q_exit"], "speedup": speedup}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    work = tempfile.TemporaryDirectory()
    model, tokenizer, train, evaluation = load_tiny(args, Path(work.name)) if args.tiny else load_real(args)
    num_labels, num_steps = model.config.num_labels, model.config.num_hidden_layers
    collator = DataCollatorWithPadding(tokenizer)
    metric = "pearson" if num_labels == 1 else "accuracy"
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"),
        learning_rate=3e-3 if args.tiny else args.lr,
        num_train_epochs=3 if args.tiny else args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,  # Adam, no scheduler
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=True,
        fp16=torch.cuda.is_available() and not args.tiny, use_cpu=args.tiny, report_to="none", seed=args.seed,
        logging_steps=50, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        compute_metrics=make_compute_metrics(num_labels, num_steps),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    trainer.train()
    results = {"task": "difficulty (tiny)" if args.tiny else args.task, "num_steps": num_steps, **trainer.evaluate()}
    results.update(time_inference(trainer.model, collator, evaluation, batch_size=64))

    out = Path(args.out)
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    config = trainer.model.config
    save_model_card(
        out / "model", "palbert", base_model=None if args.tiny else args.model, model_name=out.name,
        num_steps=num_steps, prior_lambda=config.prior_lambda, beta=config.beta, exit_threshold=config.exit_threshold,
        lambda_head=config.lambda_head,
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    results["reloaded_class"] = type(reloaded).__name__
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    work.cleanup()
    return results


if __name__ == "__main__":
    main()
