"""Demo section: DPO vs TR-DPO (soft and hard reference updates) on a preference task with a known reward.

A tiny GPT-2 is first tuned (plain SFT) to write completions "<adj> and <adj> <tail> ." with either
polarity; that is the initial policy π₀. Then DPO, TR-DPO α (soft) and TR-DPO τ (hard) train on the
same pairs from :func:`hf_ext.data.preference.preference_dataset` with the same β, learning rate and
steps. Every few steps the section samples completions for held-out prompts and reports their known
reward (# positive − # negative adjectives), the share of samples still in the "<adj> and <adj>" format,
and the KL to π₀ (the per-token KL summed along the sampled completions, averaged over prompts).

The paper's claim is about the reward *at a given KL* (TR methods overoptimize less), so the section
plots reward against KL along each run (the frontier) besides both over steps, and reports each run's
best reward within a shared KL budget (the lowest final KL of the three runs) as well as the final and
best points. The learning rate (3e-4) is the one where DPO gains reward before it breaks the format;
nothing is tuned to favour a method.
"""

import copy
import random

import torch

from hf_ext.demo import DemoContext, SectionResult, register_section

_STEPS = 48
_EVAL_EVERY = 8
_EVAL_PROMPTS = 96
_NEW_TOKENS = 7


def _sft_initial_policy(tokenizer, seed: int):
    """π₀: a tiny GPT-2 taught the completion format on both polarities (a few hundred Adam steps)."""
    from hf_ext.data.preference import preference_dataset
    from hf_ext.testing import tiny_gpt2

    model = tiny_gpt2(seed=seed).train()
    rows = preference_dataset(256, seed=seed + 1)
    prompts, completions = list(rows["prompt"]) * 2, list(rows["chosen"]) + list(rows["rejected"])
    texts = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions, strict=True)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        idx = torch.randint(0, len(texts), (64,), generator=generator)
        loss = model(
            input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx], labels=labels[idx]
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _evaluate(policy, initial, tokenizer, prompts, seed: int) -> tuple[float, float, float, float]:
    """(mean known reward of sampled completions, mean KL(π ‖ π₀) along them, share in the format, reward's s.e.)."""
    from hf_ext.data.preference import preference_reward
    from hf_ext.data.sentiment import NEGATIVE, POSITIVE

    adjectives = set(POSITIVE) | set(NEGATIVE)

    was_training = policy.training
    policy.eval()
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    batch = left(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    sequences = policy.generate(
        **batch,
        do_sample=True,
        top_k=0,  # sample from π itself (generate's default top-k 50 would truncate it), so the KL below is π's
        max_new_tokens=_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (B, T + N)
    completions = sequences[:, batch["input_ids"].shape[1] :]  # (B, N)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor([float(preference_reward(t)) for t in texts])
    words = [t.split()[:3] for t in texts]
    well_formed = sum(len(w) == 3 and w[0] in adjectives and w[1] == "and" and w[2] in adjectives for w in words)
    # mask: generated tokens up to and including the first EOS (all prompts have the same length: no padding)
    is_eos = (completions == tokenizer.eos_token_id).int()
    mask = (is_eos.cumsum(1) - is_eos) == 0
    attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
    positions = slice(batch["input_ids"].shape[1] - 1, -1)  # logits that predict the completion tokens
    log_p = policy(input_ids=sequences, attention_mask=attention).logits[:, positions].log_softmax(-1)
    log_q = initial(input_ids=sequences, attention_mask=attention).logits[:, positions].log_softmax(-1)
    kl = ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum(1).mean().item()
    policy.train(was_training)
    return rewards.mean().item(), kl, well_formed / len(texts), (rewards.std() / len(texts) ** 0.5).item()


@register_section("trdpo", title="TR-DPO: DPO vs soft/hard reference updates on a known-reward task")
def run(ctx: DemoContext) -> SectionResult:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from hf_ext.data.preference import preference_dataset, preference_prompt
    from hf_ext.testing import get_tiny_tokenizer
    from hf_ext.trainers.trdpo import TRDPOConfig, TRDPOTrainer

    tokenizer = get_tiny_tokenizer()
    initial = _sft_initial_policy(tokenizer, ctx.seed)
    rng = random.Random(ctx.seed + 100)
    prompts = [preference_prompt(rng) for _ in range(_EVAL_PROMPTS)]
    train = preference_dataset(_STEPS * 8, seed=ctx.seed + 2)
    common = dict(
        max_steps=_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-4,
        beta=0.5,
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        max_length=24,
        logging_steps=_STEPS,
        save_strategy="no",
        disable_tqdm=True,
        seed=ctx.seed,
        lr_scheduler_type="constant",
    )
    variants = {
        "DPO": (DPOTrainer, DPOConfig(str(ctx.out_dir / "dpo"), **common)),
        "TR-DPO soft (a=0.1)": (
            TRDPOTrainer,
            TRDPOConfig(str(ctx.out_dir / "soft"), ref_update="soft", alpha=0.1, **common),
        ),
        "TR-DPO hard (tau=12)": (
            TRDPOTrainer,
            TRDPOConfig(str(ctx.out_dir / "hard"), ref_update="hard", tau=12, **common),
        ),
    }

    class Probe(TrainerCallback):
        def __init__(self, policy):
            self.policy, self.points = policy, []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % _EVAL_EVERY == 0:
                self.points.append((state.global_step, *_evaluate(self.policy, initial, tokenizer, prompts, ctx.seed)))

    start = (0, *_evaluate(initial, initial, tokenizer, prompts, ctx.seed))
    curves = {}
    for name, (trainer_cls, args) in variants.items():
        policy = copy.deepcopy(initial)
        trainer = trainer_cls(
            policy, ref_model=copy.deepcopy(initial), args=args, train_dataset=train, processing_class=tokenizer
        )
        probe = Probe(policy)
        trainer.add_callback(probe)
        trainer.train()
        curves[name] = [start, *probe.points]
        best = max(curves[name], key=lambda point: point[1])
        ctx.log(
            f"{name}: final reward {curves[name][-1][1]:+.2f} at KL {curves[name][-1][2]:.2f}; best reward "
            f"{best[1]:+.2f} at KL {best[2]:.2f} (step {best[0]})"
        )
    _plot(curves, ctx.figure_path("trdpo_reward_kl.png"))
    return _result(start, curves)


def _plot(curves: dict, path) -> None:
    """Reward and KL over steps, and reward against KL (the frontier the paper's claim is about)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_kl, ax_frontier) = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, points in curves.items():
        steps, rewards, kls, _, _ = zip(*points, strict=True)
        ax_reward.plot(steps, rewards, marker="o", label=name)
        ax_kl.plot(steps, kls, marker="o", label=name)
        ax_frontier.plot(kls, rewards, marker="o", label=name)
    ax_reward.set(xlabel="optimizer step", ylabel="known reward of samples", title="Reward")
    ax_kl.set(xlabel="optimizer step", ylabel="KL(policy || initial), nats", title="KL to the initial policy")
    ax_frontier.set(xlabel="KL(policy || initial), nats", ylabel="known reward of samples", title="Reward vs KL")
    ax_reward.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _result(start: tuple, curves: dict) -> SectionResult:
    """Final and best points of each run, and each run's best reward within a shared KL budget (the frontier)."""
    budget = min(points[-1][2] for points in curves.values())  # every run reaches this KL to π₀
    stderr = max(p[4] for points in curves.values() for p in points)
    metrics = {"reward_initial": round(start[1], 3), "kl_budget": round(budget, 3), "reward_stderr": round(stderr, 3)}
    within = {}
    for key, name in zip(("dpo", "soft", "hard"), curves, strict=True):
        final, best = curves[name][-1], max(curves[name], key=lambda point: point[1])
        within[key] = max(p[1] for p in curves[name] if p[2] <= budget)
        metrics[f"reward_{key}"], metrics[f"kl_{key}"] = round(final[1], 3), round(final[2], 3)
        metrics[f"format_{key}"] = round(final[3], 3)
        metrics[f"best_reward_{key}"], metrics[f"kl_at_best_{key}"] = round(best[1], 3), round(best[2], 3)
        metrics[f"reward_within_budget_{key}"] = round(within[key], 3)
    verdicts = []
    for key in ("soft", "hard"):
        gap = within[key] - within["dpo"]
        word = "above" if gap > 2 * stderr else "below" if gap < -2 * stderr else "within two standard errors of"
        verdicts.append(f"TR-DPO {key} is {word} DPO ({gap:+.2f})")
    table = [
        {"method": n, "step": s, "reward": round(r, 3), "kl_to_initial": round(k, 3), "format": round(f, 3)}
        for n, points in curves.items()
        for s, r, k, f, _ in points
    ]
    return SectionResult(
        claim=(
            "The paper: updating the reference (TR-DPO) gives better quality at a given KL to the initial policy than "
            "DPO, i.e. less overoptimization. Checked here on the reward-vs-KL frontier of one tiny run each."
        ),
        metrics=metrics,
        table=table,
        figures=["trdpo_reward_kl.png"],
        notes=(
            f"Best reward within the KL budget {budget:.2f} nats (the lowest final KL of the three runs): "
            f"{'; '.join(verdicts)}. Tiny GPT-2 after a short SFT, {_STEPS} steps of batch 8, beta 0.5, lr 3e-4; "
            f"reward, KL and the share of samples in the '<adj> and <adj>' format from {_EVAL_PROMPTS} sampled "
            f"completions every {_EVAL_EVERY} steps, one seed (reward standard error up to {stderr:.2f}). The paper's "
            "alpha=0.6 (applied every step, the reference would trail the policy by under one step) and tau=512 suit "
            "thousands of steps; this miniature scales them to its length (alpha=0.1, tau=12). DPO itself degrades "
            f"the text as it gains reward (its format share falls from {start[3]:.2f} to {metrics['format_dpo']:.2f}: "
            "likelihood displacement in a 2-layer model). The reference update loosens the tie to the initial "
            f"policy: final KL {metrics['kl_dpo']:.2f} (DPO), {metrics['kl_soft']:.2f} (soft), "
            f"{metrics['kl_hard']:.2f} (hard). At lr 1e-3 all three lose the format within 12 steps."
        ),
    )

__all__ = ["run"]
