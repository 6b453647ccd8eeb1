"""`hf-ext sae-match`: match the features of SAEs of consecutive layers and write the matchings.

    hf-ext sae-match --repo google/gemma-scope-2b-pt-res \\
        layer_11/width_16k/average_l0_80 layer_12/width_16k/average_l0_82 layer_13/width_16k/average_l0_84 \\
        --method sparse --threshold 1e-4 --plot --output-dir out/

writes ``out/matchings.safetensors`` (`LayerMatchings.save`), ``out/summary.json``, a model card
``out/README.md`` and, with ``--plot``, ``out/persistence.png``, all at once (an earlier run's ``out`` is replaced
whole; a folder holding other files is refused). Exit status: 0 on success, 2 on bad arguments or SAE files, 1
when files could not be fetched or written.
"""

import argparse
import json
import sys
import time
from pathlib import Path

_OUTPUTS = ("matchings.safetensors", "summary.json", "README.md", "persistence.png")  # what a run writes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("locations", nargs="+", help="SAE folders of consecutive layers, in order (subfolders of --repo when given)")
    parser.add_argument("--repo", default=None, help="a Hub repository holding the SAEs; the locations are its subfolders")
    parser.add_argument("--output-dir", required=True, help="where to write matchings.safetensors and summary.json")
    parser.add_argument("--format", default="auto", help="auto, gemma_scope, saelens or sparsify (default: auto)")
    parser.add_argument("--method", default="exact", help="exact (dense LAP) or sparse (top-k candidate graph) (default: exact)")
    parser.add_argument("--using", nargs="+", default=["decoder"], help="parts compared: decoder and/or encoder (default: decoder)")
    parser.add_argument("--no-fold", action="store_true", help="do not fold JumpReLU thresholds into the weights first")
    parser.add_argument("--k", type=int, default=8, help="candidates per feature for --method sparse (default: 8)")
    parser.add_argument("--threshold", type=float, default=None, help="cost below which a feature survives a layer (persistence)")
    parser.add_argument("--plot", action="store_true", help="also write persistence.png (needs --threshold)")
    parser.add_argument("--cache-dir", default=None, help="the Hugging Face Hub cache to use")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _check_args(args: argparse.Namespace) -> None:
    from hf_ext.atomic import check_output_folder
    from hf_ext.sae_match.formats import FORMATS
    from hf_ext.sae_match.matching import METHODS, PARTS

    if len(args.locations) < 2:
        raise ValueError(f"give at least two SAE locations, got {len(args.locations)}.")
    if args.format != "auto" and args.format not in FORMATS:
        raise ValueError(f"--format must be 'auto' or one of {FORMATS}, got {args.format!r}.")
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}.")
    if any(part not in PARTS for part in args.using):
        raise ValueError(f"--using takes parts from {PARTS}, got {args.using}.")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}.")
    if args.threshold is not None and not args.threshold > 0:
        raise ValueError(f"--threshold must be > 0, got {args.threshold}.")
    if args.plot and args.threshold is None:
        raise ValueError("--plot draws persistence, which needs --threshold.")
    check_output_folder(args.output_dir, overwrite=_OUTPUTS, arg="--output-dir")


def _summary(args, saes, chain, seconds) -> dict:
    where = [f"{args.repo}/{loc}" if args.repo else loc for loc in args.locations]
    pairs = []
    for i, matching in enumerate(chain.matchings):
        cost = matching.cost.double()
        pairs.append({
            "from": where[i], "to": where[i + 1], "total_cost": matching.total, "mean_cost": float(cost.mean()),
            "median_cost": float(cost.median()), "seconds": round(seconds[i], 3),
        })
    summary = {
        "locations": where, "formats": [sae.metadata.get("format") for sae in saes],
        "d_model": saes[0].d_model, "n_features": saes[0].n_features,
        "method": args.method, "using": list(chain.matchings[0].using), "fold": not args.no_fold, "k": args.k,
        "pairs": pairs,
    }
    if args.threshold is not None:
        survive = chain.persistence(args.threshold).double()
        summary["persistence"] = {
            "threshold": args.threshold,
            "mean_layers_survived": [float(s.mean()) for s in survive[:-1]],
            "fraction_surviving_one_layer": [float((s >= 1).double().mean()) for s in survive[:-1]],
        }
    return summary


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from tqdm.auto import tqdm

    from hf_ext.sae_match.formats import load_sae
    from hf_ext.sae_match.matching import LayerMatchings, match

    try:
        saes = []
        for location in tqdm(args.locations, desc="loading SAEs", disable=args.no_progress):
            if args.repo:
                saes.append(load_sae(args.repo, location, args.format, cache_dir=args.cache_dir))
            else:
                saes.append(load_sae(location, None, args.format, cache_dir=args.cache_dir))
    except OSError as err:  # the Hub could not be reached, or the files could not be read
        print(f"hf-ext sae-match: could not load the SAEs: {err}", file=sys.stderr)
        return 1
    matchings, seconds = [], []
    for i in tqdm(range(len(saes) - 1), desc="matching", disable=args.no_progress):
        start = time.perf_counter()
        matchings.append(match(saes[i], saes[i + 1], tuple(args.using), args.method, fold=not args.no_fold, k=args.k))
        seconds.append(time.perf_counter() - start)
    chain = LayerMatchings(matchings)
    summary = _summary(args, saes, chain, seconds)
    try:
        _write_outputs(Path(args.output_dir), chain, summary, args.threshold if args.plot else None)
    except OSError as err:
        print(f"hf-ext sae-match: could not write to {args.output_dir}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(matchings)} matching(s) of {saes[0].n_features} features to {args.output_dir}")
    return 0


def _write_outputs(out: Path, chain, summary: dict, plot_threshold: float | None) -> None:
    """Write everything (and a model card, README.md) into a temporary folder beside ``out`` that then replaces it."""
    from hf_ext.atomic import atomic_folder
    from hf_ext.model_card import save_model_card

    with atomic_folder(out, overwrite=_OUTPUTS, arg="--output-dir") as tmp:
        chain.save(tmp / "matchings.safetensors")
        with open(tmp / "summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        save_model_card(tmp, "sae_match", model_name=f"SAE Match: {out.name}", solver=summary["method"], **{
            key: summary[key] for key in ("locations", "n_features", "using", "fold", "k")})
        if plot_threshold is not None:
            from hf_ext.sae_match.plots import plot_persistence

            plot_persistence(chain, plot_threshold, tmp / "persistence.png")


__all__ = ["add_arguments", "run"]
