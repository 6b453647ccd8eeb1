"""Inference latency of AoT P-Tuning against the base encoder, LoRA (unmerged) and prefix tuning.

The paper's claim (arXiv 2305.10835, §4.3): AoT adds almost nothing to the base model's inference time since the
sequence does not grow (one gather and one add per layer), unlike P-Tuning v2 / prefix tuning, and a batch that
mixes tasks costs what a single-task batch costs. All contenders run here on the same random encoder
(RoBERTa layout, default 6 layers, d = 384, vocab 30k, batch 32 x 128), interleaved round by round (the order
reversed every other round) so that the shared machine's noise hits them alike. Each method's overhead is its
time over the same model with its adapter switched off (PEFT's `disable_adapter()`; the prefix model without its
cache): copies of one encoder at different addresses differ by several percent on a CPU, which would swamp the
overhead being measured. The script prints the median wall and CPU times, and these ratios as the median over
rounds of the ratio within a round. The mixed batch cycles through the 4 tasks example by example; each layer
gathers the examples of each task as one sub-batch (as PEFT's LoRA does), so the order does not matter.

    python benchmarks/bench_aot.py                       # the sizes of the issue
    python benchmarks/bench_aot.py --batch-size 8 --repeats 5   # smaller, for a busy CPU
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import DynamicCache, RobertaConfig, RobertaForSequenceClassification

import hf_ext  # noqa: F401  (registers AoT P-Tuning with PEFT)
from hf_ext import AoTPTuningConfig

TASKS = ["task0", "task1", "task2", "task3"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prefix-length", type=int, default=16, help="virtual tokens of prefix tuning")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every contender once)")
    parser.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def encoder(args):
    config = RobertaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.seq_len + args.prefix_length + 2, num_labels=2,
    )
    torch.manual_seed(0)
    return RobertaForSequenceClassification(config).eval().to(args.device)


class PrefixTuned(nn.Module):
    """Prefix tuning / P-Tuning v2: trained keys and values for `prefix_length` virtual tokens in every layer.

    PEFT's `PrefixTuningConfig` cannot drive transformers 5 encoders (it looks for a `past_key_values`
    argument, which is now `cache`), so the prefix goes in here the way PEFT would put it: a cache pre-filled
    with the prefix per forward call, and an attention mask extended by `prefix_length` ones.
    """

    def __init__(self, model, prefix_length: int):
        super().__init__()
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        self.model = model
        self.prefix = nn.Parameter(  # (L, 2, heads, P, head_dim): keys and values of each layer
            0.02 * torch.randn(config.num_hidden_layers, 2, config.num_attention_heads, prefix_length, head_dim)
        )

    def forward(self, input_ids, attention_mask):
        batch = input_ids.shape[0]
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(self.prefix):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        prefix_mask = attention_mask.new_ones(batch, self.prefix.shape[3])
        attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache)


def randomize(model):
    """Non-zero adapter weights, so that no contender is timed on an all-zero fast path."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or "aot_" in name or "lora_" in name:
                param.normal_(0, 0.02)
    return model


def switched_off(peft_model, inputs):
    with peft_model.disable_adapter():
        return peft_model(**inputs)


def build_contenders(args):
    contenders = {"base": encoder(args)}

    aot = get_peft_model(encoder(args), AoTPTuningConfig(task_type="SEQ_CLS", reparametrization="fc"), TASKS[0])
    for task in TASKS[1:]:
        aot.add_adapter(task, AoTPTuningConfig(task_type="SEQ_CLS", reparametrization="fc"))
    randomize(aot).eval()
    aot.base_model.collapse()
    contenders["AoT (collapsed)"] = aot

    lora_config = LoraConfig(task_type="SEQ_CLS", r=args.lora_rank, target_modules=["query", "value"])
    contenders["LoRA (unmerged)"] = randomize(get_peft_model(encoder(args), lora_config)).eval()

    contenders["prefix tuning"] = PrefixTuned(encoder(args), args.prefix_length).eval()
    return contenders


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    contenders = build_contenders(args)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    input_ids = input_ids.to(args.device)
    attention_mask = torch.ones_like(input_ids)
    mixed_names = [TASKS[i % len(TASKS)] for i in range(args.batch_size)]

    aot = contenders["AoT (collapsed)"]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    calls = {name: (lambda m=model: m(**inputs)) for name, model in contenders.items()}
    calls["AoT (collapsed), 4 tasks mixed"] = lambda: aot(**inputs, adapter_names=mixed_names)
    for name in ("AoT (collapsed)", "LoRA (unmerged)"):
        calls[f"{name}, adapter off"] = lambda m=contenders[name]: switched_off(m, inputs)
    calls["prefix tuning, adapter off"] = lambda: contenders["prefix tuning"].model(**inputs)

    def timed(fn):
        """Wall time and process CPU time of one call (CPU time is steadier on a shared machine)."""
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    times = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up
            fn()
        for round_index in range(args.repeats):
            order = list(calls) if round_index % 2 == 0 else list(reversed(calls))  # no contender always goes last
            for name in order:
                times[name].append(timed(calls[name]))

    wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
    print(
        f"encoder: {args.layers} layers, d={args.hidden_size}, vocab={args.vocab_size}, batch {args.batch_size} x "
        f"{args.seq_len}, {args.device} ({args.threads} threads), median of {args.repeats} rounds"
    )
    print(f"{'contender':34s} {'wall ms':>9s} {'vs base':>8s} {'cpu ms':>9s} {'vs base':>8s}")
    for name in calls:
        print(
            f"{name:34s} {1000 * wall[name]:9.1f} {wall[name] / wall['base']:8.3f} "
            f"{1000 * cpu[name]:9.1f} {cpu[name] / cpu['base']:8.3f}"
        )
    for label, column in (("wall", 0), ("cpu", 1)):
        def ratio(numerator, denominator, column=column):
            """Median over rounds of the within-round ratio: both ran seconds apart, so slow drifts cancel."""
            rounds = zip(times[numerator], times[denominator], strict=True)
            return statistics.median(n[column] / d[column] for n, d in rounds)

        overhead = {name: 100 * (ratio(name, f"{name}, adapter off") - 1) for name in contenders if name != "base"}
        print(
            f"[{label}] overhead over the same model with the adapter off: AoT {overhead['AoT (collapsed)']:+.1f}%, "
            f"LoRA {overhead['LoRA (unmerged)']:+.1f}%, prefix tuning {overhead['prefix tuning']:+.1f}%; "
            f"mixed 4-task / single-task batch: {ratio('AoT (collapsed), 4 tasks mixed', 'AoT (collapsed)'):.3f}"
        )


if __name__ == "__main__":
    main()
