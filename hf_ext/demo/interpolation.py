"""Demo: steer a tiny LM between its pre-trained and its attribute-tuned weights with one number, alpha.

Claim (arXiv:2211.12092, abstract): linear interpolation theta_base + alpha * (theta_tuned -
theta_base) between a pre-trained and a fine-tuned model has no performance drop at intermediate
points, and alpha steers an attribute (here sentiment) towards or against what fine-tuning taught.
A tiny GPT-2 is pre-trained on balanced sentences of :mod:`hf_ext.data.sentiment`, then
fine-tuned on positive ones; for alpha from -1 to 2 we report the positive share of the
next-adjective probability and the perplexity on held-out balanced text.
"""

import copy
import tempfile
from itertools import pairwise
from pathlib import Path

import torch

from hf_ext.demo import DemoContext, SectionResult, register_section

ALPHAS = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def encode(tokenizer, texts: list[str]) -> torch.LongTensor:
    """``<s> text </s>`` for each text, right-padded into one `(N, T)` batch."""
    ids = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id] for t in texts]
    width = max(map(len, ids))
    return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])


def train_lm(model, batch: torch.LongTensor, pad_id: int, steps: int, lr: float, seed: int):
    """A few AdamW steps of next-token prediction on random rows of ``batch``; returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = batch[torch.randint(len(batch), (64,), generator=generator)]
        loss = model(rows, attention_mask=rows.ne(pad_id), labels=rows.masked_fill(rows.eq(pad_id), -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def positive_share(model, tokenizer) -> float:
    """Mean over every "<s> subject verb adverb" prompt of P(positive adj) / P(any sentiment adj) for the next word."""
    from hf_ext.data.sentiment import ADVERBS, NEGATIVE, POSITIVE, SUBJECTS, VERBS

    prompts = [f"{s} {v} {a}" for s in SUBJECTS for v in VERBS for a in ADVERBS]  # all 5 tokens long with <s>
    ids = encode(tokenizer, prompts)[:, :-1]  # drop </s>
    probs = model(ids).logits[:, -1].softmax(-1)
    pos = probs[:, tokenizer.convert_tokens_to_ids(POSITIVE)].sum(-1)
    neg = probs[:, tokenizer.convert_tokens_to_ids(NEGATIVE)].sum(-1)
    return float((pos / (pos + neg)).mean())


@torch.no_grad()
def perplexity(model, batch: torch.LongTensor, pad_id: int) -> float:
    """exp of the mean next-token NLL over the non-pad tokens of ``batch``."""
    return float(model(batch, attention_mask=batch.ne(pad_id), labels=batch.masked_fill(batch.eq(pad_id), -100)).loss.exp())


@register_section("interpolation", title="Parameter-space interpolation steers sentiment with alpha")
def run(ctx: DemoContext) -> SectionResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_ext.data.sentiment import sentiment_dataset
    from hf_ext.merging import interpolate_checkpoints, interpolate_models
    from hf_ext.testing import get_tiny_tokenizer, tiny_gpt2

    tokenizer = get_tiny_tokenizer()
    pad = tokenizer.pad_token_id
    balanced = encode(tokenizer, sentiment_dataset(2000, seed=ctx.seed)["text"])
    positive = encode(tokenizer, sentiment_dataset(1000, seed=ctx.seed + 1, positive_fraction=1.0)["text"])
    held_out = encode(tokenizer, sentiment_dataset(500, seed=ctx.seed + 2)["text"])

    ctx.log("pre-training a tiny GPT-2 on balanced sentences, then fine-tuning a copy on positive ones")
    base = train_lm(tiny_gpt2(seed=ctx.seed, tokenizer=tokenizer), balanced, pad, steps=200, lr=5e-3, seed=ctx.seed)
    tuned = train_lm(copy.deepcopy(base), positive, pad, steps=60, lr=1e-3, seed=ctx.seed + 1)

    rows = []
    for alpha in ALPHAS:
        model = interpolate_models(base, tuned, alpha)
        rows.append({"alpha": alpha, "positive_share": round(positive_share(model, tokenizer), 4),
                     "ppl_balanced": round(perplexity(model, held_out, pad), 3)})
        ctx.log(f"alpha {alpha:+.2f}: positive share {rows[-1]['positive_share']:.3f}, perplexity {rows[-1]['ppl_balanced']:.3f}")

    # The streamed path writes every alpha in one pass and gives the same model as the in-memory one.
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(Path(tmp) / "base")
        tuned.save_pretrained(Path(tmp) / "tuned")
        folders = interpolate_checkpoints(Path(tmp) / "base", Path(tmp) / "tuned", [-1.0, 0.5, 2.0], Path(tmp) / "out")
        streamed = type(tuned).from_pretrained(folders[2]).eval()
        in_memory = interpolate_models(base, tuned, 2.0)
        same = all(torch.equal(p, streamed.get_parameter(n)) for n, p in in_memory.named_parameters())

    by_alpha = {r["alpha"]: r for r in rows}
    share = [r["positive_share"] for r in rows]
    monotone = all(b >= a - 1e-3 for a, b in pairwise(share))
    worst_mid = max(by_alpha[a]["ppl_balanced"] for a in (0.25, 0.5, 0.75))
    endpoints = max(by_alpha[0.0]["ppl_balanced"], by_alpha[1.0]["ppl_balanced"])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.plot(ALPHAS, share, "o-", color="tab:green")
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("positive share of adjective prob.")
    ax2.plot(ALPHAS, [r["ppl_balanced"] for r in rows], "o-", color="tab:blue")
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("perplexity, held-out balanced text")
    for ax in (ax1, ax2):
        for x in (0.0, 1.0):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    fig.suptitle("theta = theta_base + alpha * (theta_tuned - theta_base)")
    fig.tight_layout()
    fig.savefig(ctx.figure_path("interpolation.png"), dpi=120)
    plt.close(fig)

    return SectionResult(
        claim="Interpolating between a pre-trained and an attribute-tuned LM steers the attribute with alpha, "
        "with no perplexity bump between the two models (arXiv:2211.12092).",
        metrics={
            "positive_share_alpha_-1": by_alpha[-1.0]["positive_share"],
            "positive_share_alpha_0": by_alpha[0.0]["positive_share"],
            "positive_share_alpha_0.5": by_alpha[0.5]["positive_share"],
            "positive_share_alpha_1": by_alpha[1.0]["positive_share"],
            "positive_share_alpha_2": by_alpha[2.0]["positive_share"],
            "monotone_in_alpha": str(monotone),
            "mid_ppl_over_worst_endpoint": round(worst_mid / endpoints, 4),
            "streamed_equals_in_memory": str(same),
        },
        table=rows,
        figures=["interpolation.png"],
        notes="Positive share: P(positive adjective) / P(any sentiment adjective) at the adjective slot, averaged "
        "over all 250 prompts. Perplexity on 500 held-out balanced sentences. A tiny word-level model and a "
        "synthetic corpus: the shape of the curves is the point, not the values.",
    )


__all__ = ["encode", "perplexity", "positive_share", "run", "train_lm"]
