"""`hf-ext interpolate BASE TUNED --alpha 0.5 [--alpha 1.5 ...] --out DIR`: parsing and dispatch only."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="pre-trained model: a local folder or a Hub repo id (alpha = 0)")
    parser.add_argument("tuned", help="fine-tuned model: a local folder or a Hub repo id (alpha = 1)")
    parser.add_argument(
        "--alpha", action="append", type=float, required=True, metavar="A",
        help="coefficient in theta_base + A * (theta_tuned - theta_base); outside [0, 1] extrapolates. Repeat it to "
        "write several models in one pass, into DIR/alpha_<A>",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 500MB (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: as the inputs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR once the new output is complete")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Entry point of `hf-ext interpolate`; bad input raises ValueError (exit code 2 in `hf_ext.cli.main`)."""
    from hf_ext.merging import interpolate_checkpoints

    alpha = args.alpha[0] if len(args.alpha) == 1 else args.alpha
    shard_size = int(args.shard_size) if args.shard_size.isdigit() else args.shard_size
    written = interpolate_checkpoints(
        args.base, args.tuned, alpha, args.out, shard_size=shard_size, dtype=args.dtype, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    for folder in written if isinstance(written, list) else [written]:
        print(folder)
    return 0


__all__ = ["add_arguments", "run"]
