"""Sweep alpha between GPT-2 and a sentiment-tuned GPT-2; score generations with a classifier.

theta(alpha) = theta_base + alpha * (theta_tuned - theta_base)  (arXiv:2211.12092). For each alpha
the script samples continuations of review prompts, scores them with a sentiment classifier
(positive rate), measures the model's perplexity on held-out reviews, and plots both against alpha.

    python examples/interpolate_sentiment.py                      # GPT-2 -> lvwerra/gpt2-imdb-pos-v2, IMDB prompts
    python examples/interpolate_sentiment.py --tiny               # offline, tiny models built in code (~1 min on CPU)
    python examples/interpolate_sentiment.py --save-dir models/   # also write every alpha as a checkpoint, in one pass

The defaults need the Hub (models, ``stanfordnlp/imdb``) and run on a GPU when there is one.
"""

import argparse
import copy
import json
from pathlib import Path

import torch

from hf_ext import interpolate_checkpoints, interpolate_models

DEFAULT_ALPHAS = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="openai-community/gpt2", help="pre-trained model (alpha = 0)")
    parser.add_argument("--tuned", default="lvwerra/gpt2-imdb-pos-v2", help="sentiment-tuned model (alpha = 1)")
    parser.add_argument("--classifier", default="distilbert/distilbert-base-uncased-finetuned-sst-2-english")
    parser.add_argument("--positive-label", default="POSITIVE", help="the classifier's label for the attribute")
    parser.add_argument("--alphas", type=float, nargs="+", default=DEFAULT_ALPHAS)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="interpolate_sentiment_out", help="folder for results.json and the plot")
    parser.add_argument("--save-dir", help="also write each alpha's checkpoint here (streamed, one pass)")
    parser.add_argument("--tiny", action="store_true", help="offline: tiny models and data built in code")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ inputs


def load_real(args):
    """GPT-2, the tuned GPT-2, the classifier pipeline, IMDB prompts (first 8 words) and held-out reviews."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tuned)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(args.base).to(device).eval()
    tuned = AutoModelForCausalLM.from_pretrained(args.tuned).to(device).eval()
    classifier = pipeline("text-classification", model=args.classifier, device=device)
    reviews = load_dataset("stanfordnlp/imdb", split="test").shuffle(seed=args.seed)
    prompts = [" ".join(t.split()[:8]) for t in reviews["text"][: args.num_prompts]]
    held_out = reviews["text"][args.num_prompts : args.num_prompts + 64]
    return tokenizer, base, tuned, classifier, prompts, held_out


def load_tiny(args):
    """A tiny GPT-2 pre-trained on balanced synthetic reviews, a copy tuned on positive ones, and a tiny classifier."""
    from transformers import pipeline

    from hf_ext.data.sentiment import ADVERBS, SUBJECTS, VERBS, sentiment_dataset
    from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2, tiny_roberta

    tokenizer = get_tiny_tokenizer(padding_side="left")
    balanced = sentiment_dataset(2000, seed=args.seed)
    base = train_lm(tiny_gpt2(seed=args.seed, tokenizer=tokenizer), tokenizer, balanced["text"], steps=200, lr=5e-3)
    tuned = train_lm(copy.deepcopy(base), tokenizer, sentiment_dataset(1000, seed=args.seed + 1, positive_fraction=1.0)["text"],
                     steps=60, lr=1e-3)
    clf = tiny_roberta(seed=args.seed, tokenizer=tokenizer, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    train_classifier(clf, tokenizer, balanced)
    classifier = pipeline("text-classification", model=clf, tokenizer=tokenizer, device="cpu")
    prompts = [f"{s} {v} {a}" for s in SUBJECTS for v in VERBS for a in ADVERBS][: args.num_prompts]
    held_out = sentiment_dataset(300, seed=args.seed + 2)["text"]
    return tokenizer, base, tuned, classifier, prompts, held_out


def _batch(tokenizer, texts, bos=True):
    prefix = [tokenizer.bos_token_id] if bos else []
    rows = [prefix + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    return ids, ids.ne(tokenizer.pad_token_id)


def train_lm(model, tokenizer, texts, steps, lr):
    ids, mask = _batch(tokenizer, texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(ids), (64,), generator=generator)
        loss = model(ids[rows], attention_mask=mask[rows], labels=ids[rows].masked_fill(~mask[rows], -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_classifier(model, tokenizer, dataset, steps=150):
    ids, mask = _batch(tokenizer, dataset["text"], bos=False)
    labels = torch.tensor(dataset["label"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(ids), (64,), generator=generator)
        loss = model(ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, seed, tiny):
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if tiny:  # the tiny LM was trained on "<s> sentence"
        bos = torch.full((len(prompts), 1), tokenizer.bos_token_id)
        enc = {"input_ids": torch.cat([bos, enc["input_ids"]], 1), "attention_mask": torch.cat([torch.ones_like(bos), enc["attention_mask"]], 1)}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, do_sample=True, top_k=50, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def perplexity(model, tokenizer, texts, tiny, max_length=128):
    """exp of the mean next-token NLL of ``texts`` (truncated to ``max_length`` tokens)."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
        if tiny:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1)
        ids = ids.to(model.device)
        n = ids.shape[1] - 1
        total += float(model(ids, labels=ids).loss) * n
        count += n
    return float(torch.tensor(total / count).exp())


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.num_prompts = min(args.num_prompts, 250)
        args.max_new_tokens = min(args.max_new_tokens, 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, base, tuned, classifier, prompts, held_out = (load_tiny if args.tiny else load_real)(args)

    rows = []
    for alpha in args.alphas:
        model = interpolate_models(base, tuned, alpha)
        texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.seed, args.tiny)
        labels = [r["label"] for r in classifier([p + " " + t for p, t in zip(prompts, texts, strict=True)], truncation=True)]
        rate = sum(label == args.positive_label for label in labels) / len(labels)
        rows.append({"alpha": alpha, "positive_rate": rate, "perplexity": perplexity(model, tokenizer, held_out, args.tiny),
                     "sample": prompts[0] + " " + texts[0]})
        print(f"alpha {alpha:+.2f}: positive rate {rate:.3f}, perplexity {rows[-1]['perplexity']:.2f} | {rows[-1]['sample']!r}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))

    if args.save_dir:  # the same models as checkpoints, streamed shard by shard, every alpha in one run
        if args.tiny:
            base.save_pretrained(out / "base")
            tuned.save_pretrained(out / "tuned")
            tokenizer.save_pretrained(out / "tuned")
        source = (out / "base", out / "tuned") if args.tiny else (args.base, args.tuned)
        for folder in interpolate_checkpoints(*source, list(args.alphas), args.save_dir, overwrite=True, progress=True):
            print(f"wrote {folder}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(args.alphas, [r["positive_rate"] for r in rows], "o-", color="tab:green")
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("positive rate of generations", color="tab:green")
    ax2 = ax1.twinx()
    ax2.plot(args.alphas, [r["perplexity"] for r in rows], "s--", color="tab:blue")
    ax2.set_ylabel("perplexity on held-out reviews", color="tab:blue")
    ax1.set_title(f"{Path(args.base).name} -> {Path(args.tuned).name}" if not args.tiny else "tiny GPT-2 -> positive-tuned")
    fig.tight_layout()
    fig.savefig(out / "interpolate_sentiment.png", dpi=120)
    print(f"results: {out / 'results.json'}, plot: {out / 'interpolate_sentiment.png'}")


if __name__ == "__main__":
    main()
