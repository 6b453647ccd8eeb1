"""Based / ReBased benchmark: linear-attention forms, decode latency and training throughput against Llama.

Three measurements, contender and baseline side by side in one run, printed as tables with ratios:

1. chunked vs parallel (quadratic) linear attention: forward time and peak memory at T = 512, 2048, 8192.
   The chunked form should win at long T, its memory growing linearly (the parallel one quadratically).
2. decode latency per token after a context of 256 and of 8192 tokens, Based (recurrent state + window-bounded
   KV cache) beside a Llama of the same width and depth with its growing KV cache. Based's ratio should stay
   near 1 (target <= 1.3).
3. training tokens/s (forward + backward) at T = 2048, Based vs the same Llama.

Defaults follow the issue (Based-360m-like sizes); shrink them for a CPU run, e.g.:

    python benchmarks/bench_based.py --hidden 256 --layers 10 --contexts 256 8192 --train-len 2048

Peak memory is the CUDA allocator's peak on GPU and the peak resident set (measured in a fresh process per
case) on CPU.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from hf_ext.models.based import BasedConfig, BasedForCausalLM
from hf_ext.models.based.modeling_based import linear_attention_chunked, linear_attention_parallel


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------------------------------------------------
# 1. chunked vs parallel


def _attention_inputs(args, T: int):
    torch.manual_seed(0)
    shape = (args.batch, T, args.heads)
    q, k = torch.randn(*shape, args.feature_dim), torch.randn(*shape, args.feature_dim)
    v = torch.randn(*shape, args.head_dim)
    return [x.to(args.device) for x in (q, k, v)]


def _run_form(args, form: str, T: int) -> dict:
    """Time one form at one length and measure its peak memory (MiB above the inputs)."""
    q, k, v = _attention_inputs(args, T)

    def fn():
        with torch.no_grad():
            if form == "parallel":
                return linear_attention_parallel(q, k, v, args.feature_map)
            return linear_attention_chunked(q, k, v, args.feature_map, chunk_size=args.chunk_size)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = _best_time(fn, args.device, args.repeats)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = _best_time(fn, args.device, args.repeats)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB
    return {"seconds": seconds, "peak_mib": peak}


def _form_case(args, form: str, T: int) -> dict:
    if args.device == "cuda":
        return _run_form(args, form, T)
    # A fresh process per case: the resident-set peak of the process is then this case's peak.
    cmd = [sys.executable, __file__, "--_form-case", form, str(T), *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_forms(args) -> None:
    print(f"\n## 1. chunked vs parallel linear attention ({args.feature_map}, B={args.batch}, H={args.heads}, "
          f"F={args.feature_dim}, Dv={args.head_dim}, chunk={args.chunk_size}, forward, {args.device})")
    print("| T | parallel s | chunked s | parallel/chunked time | parallel MiB | chunked MiB |")
    print("|---|---|---|---|---|---|")
    for T in args.lengths:
        parallel, chunked = _form_case(args, "parallel", T), _form_case(args, "chunked", T)
        print(f"| {T} | {parallel['seconds']:.4f} | {chunked['seconds']:.4f} | "
              f"{parallel['seconds'] / chunked['seconds']:.2f}x | {parallel['peak_mib']:.0f} | {chunked['peak_mib']:.0f} |")


# ----------------------------------------------------------------------------------------------------------------------
# 2.-3. models


def _based_config(args) -> BasedConfig:
    # Based-360m's pattern, repeated over `args.layers`: conv, linear attention, sliding window, conv, conv.
    pattern = ["conv", "linear_attention", "sliding_attention", "conv", "conv"]
    layer_types = [pattern[i % 5] for i in range(args.layers)]
    return BasedConfig.based_360m(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, layer_types=layer_types,
        num_attention_heads=args.hidden // 64, intermediate_size=2 * args.hidden, feature_map=args.feature_map,
        max_position_embeddings=max(args.contexts) + args.decode_steps + 1,
    )


def _llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=int(8 / 3 * args.hidden), tie_word_embeddings=True,
        max_position_embeddings=max(args.contexts) + args.decode_steps + 1,
    )
    return LlamaForCausalLM(config)


def _models(args):
    torch.manual_seed(0)
    based = BasedForCausalLM(_based_config(args))
    llama = _llama(args)
    return {"based": based.to(args.device), "llama": llama.to(args.device)}


def _params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@torch.no_grad()
def _decode_latency(model, args, context: int) -> float:
    """Seconds per generated token after prefilling `context` tokens (greedy, one token per forward)."""
    ids = torch.randint(1, args.vocab, (1, context), device=args.device)
    out = model(ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    cache = out.cache
    _sync(args.device)
    start = time.perf_counter()
    for step in range(args.decode_steps):
        position = torch.tensor([[context + step]], device=args.device)
        out = model(token, cache=cache, position_ids=position, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.cache
    _sync(args.device)
    return (time.perf_counter() - start) / args.decode_steps


def bench_decode(args, models) -> None:
    short, long = args.contexts
    print(f"\n## 2. decode latency per token (hidden {args.hidden}, {args.layers} layers, {args.decode_steps} steps, "
          f"{args.device})")
    print(f"| model | params (M) | ms/token @ {short} | ms/token @ {long} | ratio {long}/{short} |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        model.eval()
        latency = [_decode_latency(model, args, context) for context in (short, long)]
        print(f"| {name} | {_params(model):.1f} | {1e3 * latency[0]:.2f} | {1e3 * latency[1]:.2f} | "
              f"{latency[1] / latency[0]:.2f} |")


def bench_training(args, models) -> None:
    print(f"\n## 3. training throughput, forward + backward (T={args.train_len}, batch {args.train_batch}, {args.device})")
    print("| model | tokens/s | vs llama |")
    print("|---|---|---|")
    ids = torch.randint(1, args.vocab, (args.train_batch, args.train_len), device=args.device)
    rates = {}
    for name, model in models.items():
        model.train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        rates[name] = ids.numel() / _best_time(step, args.device, args.repeats)
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['llama']:.2f}x |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["forms", "decode", "train"], nargs="*", help="run only these parts")
    parser.add_argument("--feature-map", default="rebased", choices=["rebased", "taylor"])
    # 1. forms
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    # 2.-3. models (defaults: Based-360m-like width and depth)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--contexts", type=int, nargs=2, default=[256, 8192])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--train-len", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--_form-case", nargs=2, metavar=("FORM", "T"), help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._form_case:  # child process of bench_forms on CPU
        print(json.dumps(_run_form(args, args._form_case[0], int(args._form_case[1]))))
        return
    parts = args.only or ["forms", "decode", "train"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if "forms" in parts:
        bench_forms(args)
    if "decode" in parts or "train" in parts:
        models = _models(args)
        if "decode" in parts:
            bench_decode(args, models)
        if "train" in parts:
            bench_training(args, models)


if __name__ == "__main__":
    main()
