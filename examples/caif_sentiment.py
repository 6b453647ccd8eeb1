"""CAIF sampling with GPT-2: steer towards positive sentiment (SST-2 classifier) or away from toxicity (toxic-bert).

As in "Classifiers are Better Experts for Controllable Text Generation" (arXiv 2205.07276), an off-the-shelf
classifier with its own tokenizer re-scores GPT-2's top candidates at each step:

    python examples/caif_sentiment.py --task sentiment            # distilbert SST-2, softmax, towards POSITIVE
    python examples/caif_sentiment.py --task toxicity             # unitary/toxic-bert, sigmoid, away from "toxic"
    python examples/caif_sentiment.py --tiny                      # offline: tiny random models from hf_ext.testing

For each prompt it prints the plain sample and the CAIF sample (same seed) with the classifier's probability of
the attribute on each, and the mean of those probabilities at the end.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LogitsProcessorList

from hf_ext import CAIFLogitsProcessor

TASKS = {
    # task: (classifier, target label, activation, alpha); alpha < 0 steers away from the label
    "sentiment": ("distilbert/distilbert-base-uncased-finetuned-sst-2-english", "POSITIVE", "softmax", 5.0),
    "toxicity": ("unitary/toxic-bert", "toxic", "sigmoid", -5.0),
}
PROMPTS = ["The movie was", "I think that my neighbour", "The service at this restaurant", "Honestly, the new phone"]


def load(args):
    """The LM, its tokenizer, the classifier and its tokenizer, and the settings of ``--task``."""
    classifier_id, target, activation, alpha = TASKS[args.task]
    if args.tiny:
        from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2

        tokenizer = get_tiny_tokenizer(padding_side="left")
        lm = tiny_gpt2(tokenizer=tokenizer)  # random: its samples are word salad, which the classifier then steers
        return lm, tokenizer, train_tiny_classifier(args.task, tokenizer), tokenizer, target, activation, alpha
    tokenizer = AutoTokenizer.from_pretrained(args.lm, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 has none; left padding needs one
    lm = AutoModelForCausalLM.from_pretrained(args.lm).eval()
    classifier_tokenizer = AutoTokenizer.from_pretrained(classifier_id)
    classifier = AutoModelForSequenceClassification.from_pretrained(classifier_id).eval()
    return lm, tokenizer, classifier, classifier_tokenizer, target, activation, alpha


def train_tiny_classifier(task: str, tokenizer, steps: int = 200):
    """A tiny RoBERTa trained for a few seconds on the synthetic sentiment corpus. For ``toxicity`` it is a 6-label
    sigmoid head shaped like toxic-bert's whose "toxic" label stands for negative sentiment."""
    from hf_ext.data.sentiment import sentiment_dataset
    from hf_ext.testing import tiny_roberta

    labels = ["NEGATIVE", "POSITIVE"] if task == "sentiment" else [
        "toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    classifier = tiny_roberta(seed=1, tokenizer=tokenizer, num_labels=len(labels), id2label=dict(enumerate(labels)))
    data = sentiment_dataset(num_examples=steps * 16, seed=0)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    classifier.train()
    for i in range(0, len(data), 16):
        batch = data[i : i + 16]
        logits = classifier(**tokenizer(batch["text"], return_tensors="pt", padding=True)).logits
        y = torch.tensor(batch["label"])
        if task == "sentiment":
            loss = torch.nn.functional.cross_entropy(logits, y)
        else:  # only "toxic" (= negative here) is trained; the other five labels are shape only
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], (1 - y).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


@torch.no_grad()
def attribute_probability(texts, classifier, classifier_tokenizer, target: int, activation: str) -> list[float]:
    enc = classifier_tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    logits = classifier(**enc).logits
    probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, -1)
    return probs[:, target].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    parser.add_argument("--lm", default="openai-community/gpt2")
    parser.add_argument("--alpha", type=float, help="classifier strength (default: the task's)")
    parser.add_argument("--top-k", type=int, default=100, help="candidates re-scored per step")
    parser.add_argument("--entropy-threshold", type=float, default=2.0,
                        help="skip the classifier where the LM's entropy (nats) is below this; the demo's default")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few built-in ones")
    parser.add_argument("--tiny", action="store_true", help="offline run with tiny random models")
    args = parser.parse_args()
    if args.tiny:
        args.max_new_tokens, args.top_k = min(args.max_new_tokens, 8), min(args.top_k, 20)
        args.entropy_threshold = None  # random tiny LM: every row is near-uniform anyway
    prompts = args.prompt or (["the movie was", "the food", "this book seemed"] if args.tiny else PROMPTS)

    lm, tokenizer, classifier, classifier_tokenizer, target, activation, alpha = load(args)
    caif = CAIFLogitsProcessor(
        classifier, classifier_tokenizer, tokenizer, target_label=target,
        alpha=alpha if args.alpha is None else args.alpha, top_k=args.top_k, entropy_threshold=args.entropy_threshold,
        activation=activation,
    )
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    generate = dict(do_sample=True, top_k=0, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    outputs = {}
    for name, processors in [("plain", []), ("caif", [caif])]:
        torch.manual_seed(args.seed)
        out = lm.generate(**inputs, logits_processor=LogitsProcessorList(processors), **generate)
        outputs[name] = tokenizer.batch_decode(out, skip_special_tokens=True)

    print(f"task {args.task}: target {target!r} ({activation}), alpha {caif.alpha:+g}, top_k {args.top_k}, "
          f"entropy threshold {args.entropy_threshold}")
    means = {}
    for name, texts in outputs.items():
        probs = attribute_probability(texts, classifier, classifier_tokenizer, caif.target_label, activation)
        means[name] = sum(probs) / len(probs)
        for text, p in zip(texts, probs, strict=True):
            print(f"[{name:5s} p={p:.3f}] {text!r}")
    print(f"mean p({target}): plain {means['plain']:.3f}, caif {means['caif']:.3f}")


if __name__ == "__main__":
    main()
