"""Sample from a trained DDLM pipeline folder, with and without early exit (arXiv:2305.10818).

    python examples/ddlm_sample.py --pipeline ddlm-c4 --num_samples 8 --length 64 --steps 200 --early_exit kl
    python examples/ddlm_sample.py --tiny        # the folder written by `examples/ddlm_train.py --tiny`

Prints each sample and the Euler steps it used; `--prompt` keeps a clean prefix. `--compare` runs
every halting criterion beside the full run and prints the share of steps saved and the share of
tokens identical to the full run's.
"""

import argparse
import sys

import torch

from hf_ext import DDLMPipeline


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="A saved DDLMPipeline folder or Hub id (default: ddlm-c4).")
    parser.add_argument("--tiny", action="store_true", help="Use ./ddlm-tiny, the output of ddlm_train.py --tiny.")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=None, help="Tokens per sample (default: the model's maximum).")
    parser.add_argument("--steps", type=int, default=200, help="Euler steps (CDCD: 200).")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--early_exit", choices=["entropy", "switches", "kl"], default=None)
    parser.add_argument("--compare", action="store_true", help="Run every criterion beside the full run.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.pipeline = args.pipeline or ("ddlm-tiny" if args.tiny else "ddlm-c4")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pipe = DDLMPipeline.from_pretrained(args.pipeline)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    length = args.length or pipe.model.config.max_position_embeddings

    def sample(criterion):
        return pipe(num_samples_per_prompt=args.num_samples, length=length, num_inference_steps=args.steps, prompt=args.prompt,
                    early_exit=criterion, generator=torch.Generator().manual_seed(args.seed))

    if not args.compare:
        out = sample(args.early_exit)
        for text, steps in zip(out.texts, out.steps_used.tolist(), strict=True):
            print(f"[{steps:4d} steps] {text}")
        return 0
    full = sample(None)
    print(f"{'early_exit':>10} | steps saved | tokens as in the full run")
    for criterion in ("entropy", "switches", "kl"):
        out = sample(criterion)
        saved = 1 - out.steps_used.float().mean().item() / args.steps
        same = (out.sequences == full.sequences).float().mean().item()
        print(f"{criterion:>10} | {saved:11.1%} | {same:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
