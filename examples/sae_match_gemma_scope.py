"""SAE Match on Gemma Scope: match the 16k residual SAEs of adjacent Gemma-2-2B layers.

    python examples/sae_match_gemma_scope.py --layers 11 12 13 --method sparse
    python examples/sae_match_gemma_scope.py --layers 11 12 --evaluate --num-texts 20   # also runs Gemma-2-2B
    python examples/sae_match_gemma_scope.py --tiny                                    # offline, generated SAEs

Steps: load the SAEs from the Hub (only their params.npz), match each layer to the next on folded
decoders, report the matching cost and how many layers features survive, draw the persistence plot,
and with ``--evaluate`` score each pair on the model's hidden states: explained variance of the
encode-permute-decode approximation (Eq. 5), the Matching Score and delta-L.

``--tiny`` writes generated (planted) SAEs as a Gemma Scope repository into a local Hub cache, loads
them back offline through the same code path, and evaluates on a tiny random Llama.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from hf_ext.sae_match import (
    delta_lm_loss,
    evaluate_approximation,
    folded_mse,
    load_sae,
    match_layers,
    matching_score,
    plot_persistence,
)
from hf_ext.sae_match.metrics import collect_hidden_states

REPO = "google/gemma-scope-2b-pt-res"
MODEL = "google/gemma-2-2b"
# average_l0 of the SAEs the paper uses (Table 1; layers 0-1 as in SAELens' canonical set)
PAPER_L0 = [105, 102, 141, 59, 125, 68, 70, 69, 71, 73, 77, 80, 82, 83, 83, 78, 78, 77, 74, 73, 71, 70, 72, 75, 73, 116]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=REPO)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 13], help="consecutive layers, in order")
    parser.add_argument("--width", default="16k")
    parser.add_argument("--l0", type=int, nargs="+", default=None, help="average_l0 of each layer's SAE (default: the paper's)")
    parser.add_argument("--method", default="sparse", choices=["exact", "sparse"])
    parser.add_argument("--using", nargs="+", default=["decoder"])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=None, help="persistence cost threshold (default: median cost)")
    parser.add_argument("--evaluate", action="store_true", help="score each pair on the model's hidden states")
    parser.add_argument("--num-texts", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output-dir", default="sae_match_gemma_scope")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tiny", action="store_true", help="offline: generated SAEs and a tiny random model")
    args = parser.parse_args()
    if args.l0 is not None and len(args.l0) != len(args.layers):
        parser.error(f"--l0 needs one value per layer: {len(args.layers)} layers {args.layers}, got {len(args.l0)} values {args.l0}")
    return args


def tiny_setup(args, workdir: Path):
    """Generated SAEs laid out as a Gemma Scope Hub repository, a tiny Llama and its tokenizer."""
    from hf_ext.sae_match import save_sae
    from hf_ext.sae_match.synthetic import planted_chain
    from hf_ext.testing import get_tiny_tokenizer, lay_out_as_hub_repo, tiny_corpus, tiny_llama

    os.environ["HF_HUB_OFFLINE"] = "1"
    args.layers, args.l0, args.cache_dir = [0, 1], [50, 51], str(workdir / "cache")
    tokenizer = get_tiny_tokenizer()
    model, texts = tiny_llama(tokenizer=tokenizer), tiny_corpus()[: args.num_texts]
    saes, _ = planted_chain(n_layers=2, n_features=512, d_model=model.config.hidden_size, noise=0.3, seed=0)
    # The generated encoders know nothing of this model: scale them to its hidden-state norms so
    # that features fire (a folded feature fires when <e_i, x> + c_i > 1).
    norm = collect_hidden_states(model, tokenizer, texts, [0])[0].norm(dim=1).median()
    for layer, l0, sae in zip(args.layers, args.l0, saes, strict=True):
        sae.W_enc.data *= 2 * model.config.hidden_size**0.5 / norm
        save_sae(sae, workdir / "repo" / f"layer_{layer}" / f"width_{args.width}" / f"average_l0_{l0}", format="gemma_scope")
    lay_out_as_hub_repo(workdir / "repo", args.repo, args.cache_dir)
    return model, tokenizer, texts

def real_setup(args):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map="auto").eval()
    texts = load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="test")["text"]
    texts = [t for t in texts if len(t) > 500][: args.num_texts]
    return model, tokenizer, texts


def main():
    args = parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = tokenizer = texts = None
        if args.tiny:
            model, tokenizer, texts = tiny_setup(args, Path(tmp))
            args.evaluate = True
        l0 = args.l0 or [PAPER_L0[layer] for layer in args.layers]
        subfolders = [f"layer_{layer}/width_{args.width}/average_l0_{n}" for layer, n in zip(args.layers, l0, strict=True)]

        # 1. load and match
        saes = [load_sae(args.repo, sub, cache_dir=args.cache_dir) for sub in subfolders]
        chain = match_layers(saes, tuple(args.using), args.method, k=args.k, progress=True)
        chain.save(out / "matchings.safetensors")
        threshold = args.threshold or float(torch.cat([m.cost for m in chain.matchings]).median())
        plot_persistence(chain, threshold, out / "persistence.png")
        report = {"subfolders": subfolders, "method": args.method, "threshold": threshold, "pairs": []}
        survive = chain.persistence(threshold)
        for i, m in enumerate(chain.matchings):
            row = {"from": args.layers[i], "to": args.layers[i + 1], "folded_mse": folded_mse(saes[i], saes[i + 1], m),
                   "mean_layers_survived": float(survive[i].double().mean())}
            report["pairs"].append(row)

        # 2. evaluate on the model's hidden states (Eq. 5, Matching Score, delta-L)
        if args.evaluate:
            if model is None:
                model, tokenizer, texts = real_setup(args)
            device = next(model.parameters()).device
            hidden = collect_hidden_states(model, tokenizer, texts, args.layers, max_length=args.max_length)
            for i, (row, m) in enumerate(zip(report["pairs"], chain.matchings, strict=True)):
                sae_a, sae_b = saes[i].to(device), saes[i + 1].to(device)
                ha, hb = hidden[args.layers[i]].to(device), hidden[args.layers[i + 1]].to(device)
                row.update(evaluate_approximation(sae_a, sae_b, m, ha, hb))
                row["matching_score"] = matching_score(sae_a, sae_b, m, ha, hb)
                row.update(delta_lm_loss(model, tokenizer, texts, args.layers[i], sae_a, sae_b, m, max_length=args.max_length))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        if args.tiny:
            print("--tiny: the generated SAEs are unrelated to the tiny model; the numbers only show that the pipeline runs.")
        print(f"wrote {out / 'matchings.safetensors'}, {out / 'persistence.png'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
