"""PALBERT Q-exit against full-depth ALBERT: wall time at batch 1 and batch 64 on the same inputs.

The contender is `PalbertForSequenceClassification` in `"q_exit"` mode, whose exited examples leave the batch;
the baseline is `AlbertForSequenceClassification` with the same weights, running all L steps. The ideal
speed-up is L / mean exit step; the issue's target is >= 80% of it at batch 64. PALBERT's `"full"` mode is
timed as well, to show the step-by-step loop itself costs nothing.

Both models are random (albert-base-v2 sizes by default). A random exit head would send every example out at
the same step, so the exit head here is PonderNet's linear one, set along the main direction in which the
inputs' pooled states differ and shifted until the mean exit step is `--mean-exit`: examples then exit at
different steps (the printed histogram shows which). This measures how much of the ideal speed-up batched
early exit realises, not accuracy. Timings are medians over rounds that run every contender once, so that
noise hits them alike.

    python benchmarks/bench_palbert.py                                       # albert-base sizes, T = 128
    python benchmarks/bench_palbert.py --hidden-size 256 --heads 4 --intermediate-size 1024 --seq-len 64
"""

import argparse
import statistics
import time

import torch
from transformers import AlbertConfig, AlbertForSequenceClassification

from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification
from hf_ext.models.palbert.modeling_palbert import exit_distribution, q_exit_step


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate-size", type=int, default=3072)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="the large batch; batch 1 runs the same examples")
    parser.add_argument("--batch1-examples", type=int, default=64, help="how many of them to time one by one")
    parser.add_argument("--mean-exit", type=float, default=4.0, help="target mean exit step of the calibrated head")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every contender once)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def build_models(args):
    albert_config = AlbertConfig(
        vocab_size=args.vocab_size, embedding_size=args.embedding_size, hidden_size=args.hidden_size,
        num_attention_heads=args.heads, intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        max_position_embeddings=max(512, args.seq_len),
    )
    torch.manual_seed(0)
    albert = AlbertForSequenceClassification(albert_config).eval()
    fields = {k: v for k, v in albert_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    palbert = PalbertForSequenceClassification(PalbertConfig(**fields, lambda_head="linear")).eval()
    missing, _ = palbert.load_state_dict(albert.state_dict(), strict=False)
    if any(not k.startswith("albert.lambda_head.") for k in missing):  # the same encoder, pooler and classifier
        raise RuntimeError(f"PALBERT did not take these ALBERT weights: {missing}")
    return albert.to(args.device), palbert.to(args.device)


@torch.no_grad()
def calibrate_exit_head(palbert, input_ids, mean_exit: float) -> torch.Tensor:
    """Point the linear exit head along the pooled states' main direction; shift it to the target mean exit."""
    steps = palbert.albert(input_ids, inference_mode="full").step_pooler_outputs
    pooled = steps[:, :-1].float()  # (B, L - 1, H): the steps that have a lambda
    persistent = (pooled - pooled.mean(dim=0)).mean(dim=1)  # (B, H): how an example differs, on average over steps
    direction = torch.linalg.svd(persistent, full_matrices=False).Vh[0]
    weight = 2.0 * direction / (persistent @ direction).std()  # examples' exit logits spread with std ~2
    offset = -(pooled.mean(dim=(0, 1)) @ weight)

    def mean_exit_for(bias: float) -> float:
        lambdas = torch.sigmoid(pooled @ weight + offset + bias)
        return q_exit_step(exit_distribution(lambdas), palbert.config.exit_threshold).float().mean().item()

    low, high = -20.0, 20.0  # mean exit decreases as the bias grows
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_exit_for(middle) > mean_exit else (low, middle)
    # Bisection converges onto a jump of the mean exit step, where one example's cumulative exit probability
    # equals q and rounding (batch 1 vs batch 64 kernels) decides its exit; step off the jump.
    palbert.albert.lambda_head.out.weight.copy_(weight[None])
    palbert.albert.lambda_head.out.bias.fill_(offset + high + 0.01)
    return palbert(input_ids).exit_step


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    albert, palbert = build_models(args)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    input_ids[:, 0] = 2  # [CLS]
    exit_step = calibrate_exit_head(palbert, input_ids, args.mean_exit)
    mean_exit = exit_step.float().mean().item()
    ideal = args.layers / mean_exit
    print(f"device={args.device} threads={args.threads} L={args.layers} H={args.hidden_size} T={args.seq_len}")
    print(f"exit steps at batch {args.batch_size}: mean {mean_exit:.2f}, histogram "
          f"{torch.bincount(exit_step.cpu() - 1, minlength=args.layers).tolist()}; ideal speed-up {ideal:.2f}x")

    one_by_one = input_ids[: args.batch1_examples]
    contenders = {
        ("albert", 1): lambda: [albert(row[None]) for row in one_by_one],
        ("palbert_full", 1): lambda: [palbert(row[None], inference_mode="full") for row in one_by_one],
        ("palbert_q_exit", 1): lambda: [palbert(row[None]) for row in one_by_one],
        ("albert", args.batch_size): lambda: albert(input_ids),
        ("palbert_full", args.batch_size): lambda: palbert(input_ids, inference_mode="full"),
        ("palbert_q_exit", args.batch_size): lambda: palbert(input_ids),
    }
    with torch.no_grad():
        alone = torch.cat([palbert(row[None]).exit_step for row in one_by_one])
        same = (alone == exit_step[: args.batch1_examples]).float().mean().item()
        batch1_ideal = args.layers / alone.float().mean().item()
        times = {key: [] for key in contenders}
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for key, fn in contenders.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - start)
    print(f"batch-1 exit steps equal to the batched ones: {same:.0%}")
    print(f"{'batch':>6} {'examples':>8} {'ALBERT s':>10} {'PALBERT full s':>15} {'PALBERT q_exit s':>17} "
          f"{'speed-up':>9} {'ideal':>6} {'% of ideal':>10}")
    for batch, examples, ideal_here in ((1, len(one_by_one), batch1_ideal), (args.batch_size, args.batch_size, ideal)):
        names = ("albert", "palbert_full", "palbert_q_exit")
        base, full, early = (statistics.median(times[(name, batch)]) for name in names)
        speedup = base / early
        print(f"{batch:>6} {examples:>8} {base:>10.3f} {full:>15.3f} {early:>17.3f} {speedup:>8.2f}x "
              f"{ideal_here:>5.2f}x {speedup / ideal_here:>10.0%}")


if __name__ == "__main__":
    main()
