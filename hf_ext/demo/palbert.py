"""PALBERT in miniature: a tiny ALBERT trained to ponder exits early and keeps its accuracy.

A tiny 6-step ALBERT is trained from scratch with the PALBERT loss on
:func:`hf_ext.data.difficulty.difficulty_dataset` (is the bag of adjectives mostly positive? difficulty =
how many adjectives disagree). On held-out data it is evaluated at full depth and with the Q-exit rule
(q = 0.5), where exited examples leave the batch. The speed-up is wall time of full depth over Q-exit on
the same batch, beside the ideal L / mean exit step.
"""

import time

import torch

from hf_ext.demo import DemoContext, SectionResult, register_section

NUM_STEPS = 6


def _encode(tokenizer, data):
    """`[bos] + words` as a `(N, T)` id tensor (every text has the same word count, so no padding)."""
    rows = tokenizer(list(data["text"]))["input_ids"]
    input_ids = torch.tensor([[tokenizer.bos_token_id] + row for row in rows])  # bos stands in for [CLS]
    return input_ids, torch.tensor(list(data["label"])), torch.tensor(list(data["difficulty"]))


def _best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@register_section("palbert", title="PALBERT: a pondering ALBERT exits early per example")
def run(ctx: DemoContext) -> SectionResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_ext.data.difficulty import difficulty_dataset
    from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification
    from hf_ext.testing import get_tiny_tokenizer

    torch.manual_seed(ctx.seed)
    tokenizer = get_tiny_tokenizer()
    train_ids, train_labels, _ = _encode(tokenizer, difficulty_dataset(2000, seed=ctx.seed, num_polar=9))
    test_data = difficulty_dataset(1024, seed=ctx.seed + 1, num_polar=9)
    test_ids, test_labels, test_difficulty = _encode(tokenizer, test_data)

    # prior_lambda = 0.5 (prior mean 2 steps) instead of the paper's 0.1: with L = 6, lambda_p = 0.1 puts 59% of
    # the prior on the last step, and this easy task then learns to run to the end.
    config = PalbertConfig(
        vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_hidden_layers=NUM_STEPS, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
        classifier_dropout_prob=0.0, lambda_head_layers=1, prior_lambda=0.5, beta=0.5,
    )
    model = PalbertForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        batch = torch.randint(0, len(train_ids), (32,))
        loss = model(train_ids[batch], labels=train_labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ctx.log(f"trained 120 steps, last loss {loss.item():.3f}")

    with torch.no_grad():
        full = model(test_ids, inference_mode="full")
        early = model(test_ids)
        full_seconds = _best_time(lambda: model(test_ids, inference_mode="full"))
        early_seconds = _best_time(lambda: model(test_ids))
    full_correct = full.logits.argmax(-1) == test_labels
    early_correct = early.logits.argmax(-1) == test_labels
    mean_exit = early.exit_step.float().mean().item()

    table = []
    for level in sorted(set(test_difficulty.tolist())):
        rows = test_difficulty == level
        table.append({
            "difficulty": level,
            "examples": int(rows.sum()),
            "acc_full": round(full_correct[rows].float().mean().item(), 4),
            "acc_q_exit": round(early_correct[rows].float().mean().item(), 4),
            "mean_exit_step": round(early.exit_step[rows].float().mean().item(), 3),
        })

    figure, axis = plt.subplots(figsize=(5, 3))
    counts = torch.bincount(early.exit_step - 1, minlength=NUM_STEPS)
    axis.bar(range(1, NUM_STEPS + 1), counts.tolist())
    axis.set(xlabel="exit step (layer applications)", ylabel="test examples", title="PALBERT Q-exit steps")
    figure.tight_layout()
    figure.savefig(ctx.figure_path("palbert_exit_steps.png"))
    plt.close(figure)

    return SectionResult(
        claim="PALBERT's Q-exit keeps full-depth accuracy while running fewer ALBERT layer steps per example",
        metrics={
            "acc_full_depth": round(full_correct.float().mean().item(), 4),
            "acc_q_exit": round(early_correct.float().mean().item(), 4),
            "mean_exit_step": round(mean_exit, 3),
            "ideal_speedup": round(NUM_STEPS / mean_exit, 3),
            "measured_speedup": round(full_seconds / early_seconds, 3),
        },
        table=table,
        figures=["palbert_exit_steps.png"],
        notes=(
            "Tiny model trained from scratch for seconds; speed-up measured on one batch of 1024 on this CPU. "
            f"prior_lambda=0.5 (paper: 0.1 with L=12), beta=0.5, q=0.5, L={NUM_STEPS}."
        ),
    )


__all__ = ["run"]
