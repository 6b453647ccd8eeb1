"""Demo: a tiny DDLM trained in seconds, sampled with and without DDLM's early exit.

Claim (DDLM, arXiv:2305.10818 v2+): generation of score-interpolation diffusion LMs can be halted
early per sample, saving 10-40% of the steps with no drop in quality. Here: steps saved per criterion
and the NLL of the samples under a tiny autoregressive model trained on the same corpus.
"""

import time

import torch

from hf_ext.demo import DemoContext, SectionResult, register_section

LENGTH = 24


def pack_corpus(tokenizer, length: int = LENGTH) -> torch.LongTensor:
    """The tiny corpus as one token stream (sentences joined by EOS), cut into `(N, length)` blocks."""
    from hf_ext.testing import tiny_corpus

    stream = []
    for sentence in tiny_corpus():
        stream += tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // length
    return torch.tensor(stream[: n * length]).view(n, length)


def train_tiny_ddlm(
    blocks: torch.LongTensor, tokenizer, seconds: float, max_steps: int = 10**9, seed: int = 0, batch_size: int = 64
):
    """Train a small DDLM (2 layers, width 64) on `blocks` for `max_steps` or `seconds`, whichever ends first."""
    from hf_ext import DDLMConfig, DDLMModel

    torch.manual_seed(seed)
    config = DDLMConfig(
        vocab_size=len(tokenizer), embedding_dim=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=blocks.shape[1], pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = DDLMModel(config).train()
    # the time-warp curve gets a larger learning rate so that it follows the loss within a short run
    # (Plaid's CDCD re-implementation fits its LossCDF at 1e-2 while the model trains at 1e-4 or so)
    warp = list(model.time_warp.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("time_warp.")]
    groups = [{"params": rest, "lr": 3e-3}, {"params": warp, "lr": 3e-2}]
    return _train(model, blocks, seconds, max_steps, batch_size, groups, loss_fn=lambda m, ids: m(ids, labels=ids).loss)


def train_tiny_ar(
    blocks: torch.LongTensor, tokenizer, seconds: float, max_steps: int = 10**9, seed: int = 0, batch_size: int = 64
):
    """Train a tiny GPT-2 on the same blocks, as the quality judge (AR-NLL, as in CDCD's evaluation)."""
    from hf_ext.testing import tiny_gpt2

    model = tiny_gpt2(seed=seed, tokenizer=tokenizer).train()
    groups = [{"params": list(model.parameters()), "lr": 3e-3}]
    return _train(model, blocks, seconds, max_steps, batch_size, groups, loss_fn=lambda m, ids: m(ids, labels=ids).loss)


def _train(model, blocks, seconds, max_steps, batch_size, param_groups, loss_fn):
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(max_steps):
        if time.perf_counter() - start > seconds:
            break
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def ar_nll(ar_model, sequences: torch.LongTensor) -> float:
    """Mean per-token NLL (nats) of `sequences` under `ar_model` (the first token is not scored)."""
    return float(ar_model(sequences, labels=sequences).loss)


@torch.no_grad()
def calibrate_thresholds(pipe, num_samples: int, num_inference_steps: int, seed: int = 1, tail: float = 0.1) -> dict:
    """Halting thresholds read off one full calibration run: each criterion's median over its last `tail` of steps.

    A sample then halts once it looks as settled as a typical sample does at the end of a full run. The
    paper's thresholds are NOT VERIFIED, and any fixed value depends on how well the model is trained.
    """
    history = []

    def record(p, i, t, kwargs):
        history.append(kwargs["logits"].clone())
        return {}

    pipe(num_samples_per_prompt=num_samples, length=pipe.model.config.max_position_embeddings, num_inference_steps=num_inference_steps,
         generator=torch.Generator().manual_seed(seed), callback_on_step_end=record, callback_on_step_end_tensor_inputs=["logits"])
    everywhere = torch.ones(history[0].shape[:2], dtype=torch.bool)
    first = int(num_inference_steps * (1 - tail))
    thresholds = {}
    for criterion, key in (("entropy", "entropy_threshold"), ("switches", "switch_threshold"), ("kl", "kl_threshold")):
        values = torch.stack([
            pipe.scheduler.halting_statistic(criterion, history[i], history[i - 1], everywhere)
            for i in range(max(first, 1), num_inference_steps)
        ])
        thresholds[key] = float(values.median())
    return thresholds


def compare_early_exit(pipe, ar_model, num_samples: int, num_inference_steps: int, criteria, seed: int = 0):
    """Sample with every criterion and without; one row each: steps used, share saved, AR-NLL, tokens as in the
    full run (DDLM judges halted samples against the full run's), time."""
    rows, full = [], None
    for criterion in (None, *criteria):
        start = time.perf_counter()
        out = pipe(num_samples_per_prompt=num_samples, length=pipe.model.config.max_position_embeddings,
                   num_inference_steps=num_inference_steps, early_exit=criterion,
                   generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        full = out.sequences if full is None else full
        mean_steps = out.steps_used.float().mean().item()
        rows.append({
            "early_exit": criterion or "none", "mean_steps": round(mean_steps, 1),
            "steps_saved": round(1 - mean_steps / num_inference_steps, 3), "ar_nll": round(ar_nll(ar_model, out.sequences), 3),
            "same_tokens": round((out.sequences == full).float().mean().item(), 3),
            "seconds": round(seconds, 2), "sample": out.texts[0],
        })
    return rows


@register_section("ddlm", title="DDLM: continuous diffusion LM that halts early")
def run(ctx: DemoContext) -> SectionResult:
    # torch's thread count is the runner's `--threads` (default 1, fastest for these width-64 models)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_ext import DDLMPipeline, DDLMScheduler
    from hf_ext.testing import get_tiny_tokenizer

    tokenizer = get_tiny_tokenizer()
    blocks = pack_corpus(tokenizer)
    ctx.log(f"training a tiny DDLM on {len(blocks)} blocks of {LENGTH} tokens (<= 12 s) and a tiny GPT-2 judge (<= 4 s)")
    model = train_tiny_ddlm(blocks, tokenizer, seconds=12, max_steps=400, seed=ctx.seed)
    ar_model = train_tiny_ar(blocks, tokenizer, seconds=4, max_steps=200, seed=ctx.seed)
    pipe = DDLMPipeline(model=model, scheduler=DDLMScheduler(), tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)

    steps = 100
    # the scheduler's default thresholds are guesses for full-size models; this miniature's predictions stay
    # uncertain to the end, so its thresholds come from a calibration run with another seed
    thresholds = calibrate_thresholds(pipe, num_samples=8, num_inference_steps=steps, seed=ctx.seed + 1)
    pipe.scheduler = DDLMScheduler(**thresholds, halting_patience=3)
    ctx.log("calibrated thresholds: " + ", ".join(f"{k}={v:.4g}" for k, v in thresholds.items()))
    rows = compare_early_exit(pipe, ar_model, num_samples=16, num_inference_steps=steps, criteria=("entropy", "switches", "kl"))
    random_nll = ar_nll(ar_model, torch.randint(5, len(tokenizer), (32, LENGTH), generator=torch.Generator().manual_seed(1)))
    data_nll = ar_nll(ar_model, blocks[:32])
    for row in rows:
        ctx.log(f"{row['early_exit']:>8}: {row['mean_steps']:5.1f}/{steps} steps ({row['steps_saved']:.0%} saved), "
                f"AR-NLL {row['ar_nll']:.3f}, tokens as full run {row['same_tokens']:.0%}, {row['seconds']:.2f} s | {row['sample']}")
    ctx.log(f"AR-NLL reference points: corpus {data_nll:.3f}, random tokens {random_nll:.3f}")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([r["early_exit"] for r in rows], [r["ar_nll"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r["ar_nll"], f"{r['steps_saved']:.0%} saved\n{r['same_tokens']:.0%} same", ha="center", va="bottom",
                fontsize=7)
    ax.axhline(data_nll, color="tab:green", linestyle="--", label="corpus")
    ax.set_ylim(0, 1.3 * max(r["ar_nll"] for r in rows))  # room for the labels
    ax.set_ylabel("AR-NLL of samples (nats/token)")
    ax.set_title(f"DDLM early exit ({steps} Euler steps)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure_path("ddlm_early_exit.png"), dpi=120)
    plt.close(fig)

    full = rows[0]
    metrics = {"steps": steps, "ar_nll_full": full["ar_nll"], "ar_nll_corpus": round(data_nll, 3),
               "ar_nll_random": round(random_nll, 3)}
    for row in rows[1:]:
        metrics[f"steps_saved_{row['early_exit']}"] = row["steps_saved"]
        metrics[f"ar_nll_{row['early_exit']}"] = row["ar_nll"]
        metrics[f"same_tokens_{row['early_exit']}"] = row["same_tokens"]
    return SectionResult(
        claim="Diffusion LM generation can be halted early per sample, saving steps with little change in quality.",
        metrics=metrics,
        table=[{k: v for k, v in r.items() if k != "sample"} for r in rows],
        figures=["ddlm_early_exit.png"],
        notes="Tiny model trained <= 12 s on the built-in corpus; the criteria's definitions and thresholds are ours "
              "(the paper's are NOT VERIFIED); quality: AR-NLL under a tiny GPT-2 trained on the same corpus, and the "
              "share of tokens identical to the full run's.",
    )


__all__ = ["ar_nll", "calibrate_thresholds", "compare_early_exit", "pack_corpus", "run", "train_tiny_ar", "train_tiny_ddlm"]
