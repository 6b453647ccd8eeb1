"""Benchmark SAE Match's assignment solvers on synthetic adjacent-layer SAE pairs.

Contenders, on one planted pair of JumpReLU SAEs (``--n-features`` x ``--d-model``, default 16,384 x 2,304
as Gemma Scope 2B's 16k residual SAEs), all on the folded decoder rows:

- baseline: SciPy ``linear_sum_assignment`` on a cost matrix built the naive way, in float64 numpy
  (``|a|^2 + |b|^2 - 2 a b^T`` over the whole matrix at once);
- ``match(method="exact")``: the same SciPy solver on a matrix built in float32 blocks straight into
  its float64 buffer;
- ``match(method="sparse")``: top-k candidates computed in blocks, then a sparse min-cost matching.

Then one wider pair (``--wide-features``, default 65,536) with the sparse solver only (its dense
cost matrix would take 34 GB).

Peak memory is the peak resident set size above the level before the step, sampled every 5 ms.
Wall time and process CPU time (all threads) are both reported: on a shared, busy machine the CPU
time is the steadier of the two. Ratios (baseline / contender) are printed at the end.

    python benchmarks/bench_sae_match.py                       # the full run (the 16k baseline holds ~6 GiB)
    python benchmarks/bench_sae_match.py --n-features 4096 --d-model 512 --wide-features 0   # quick
"""

import argparse
import gc
import os
import threading
import time

import numpy as np
import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (sampled in a thread)."""

    def __enter__(self):
        gc.collect()
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0  # all threads; robust to a busy shared machine
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.extra_gb = (self.peak - self.start) / 2**30


def naive_float64_lsa(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    a64, b64 = a.double().numpy(), b.double().numpy()
    cost = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2 * a64 @ b64.T
    return torch.from_numpy(linear_sum_assignment(cost)[1])


def run_pair(n, d, noise, k, seed, with_baseline, with_exact, shared_fraction=1.0):
    from hf_ext.sae_match import match
    from hf_ext.sae_match.matching import feature_vectors
    from hf_ext.sae_match.synthetic import planted_pair

    print(f"\n== pair {n} x {d} (noise {noise}, shared fraction {shared_fraction}, seed {seed}) ==", flush=True)
    sae_a, sae_b, truth = planted_pair(n, d, noise=noise, shared_fraction=shared_fraction, seed=seed)
    # the SAEs' encoders are not used by a decoder-only match: drop them to save memory
    for sae in (sae_a, sae_b):
        sae.W_enc = torch.nn.Parameter(torch.empty(d, 0), requires_grad=False)
    rows, results = [], {}
    if with_baseline:
        a, b = feature_vectors(sae_a, fold=True), feature_vectors(sae_b, fold=True)
        with PeakMemory() as mem:
            results["baseline"] = naive_float64_lsa(a, b)
        rows.append(("scipy LSA, naive float64 cost", mem.seconds, mem.cpu_seconds, mem.extra_gb))
        del a, b
        print(f"  baseline: {mem.seconds:.1f} s ({mem.cpu_seconds:.1f} s CPU), +{mem.extra_gb:.2f} GiB", flush=True)
    if with_exact:
        with PeakMemory() as mem:
            results["exact"] = match(sae_a, sae_b, method="exact").permutation
        rows.append(("match(method='exact')", mem.seconds, mem.cpu_seconds, mem.extra_gb))
        print(f"  exact:    {mem.seconds:.1f} s ({mem.cpu_seconds:.1f} s CPU), +{mem.extra_gb:.2f} GiB", flush=True)
    with PeakMemory() as mem:
        results["sparse"] = match(sae_a, sae_b, method="sparse", k=k).permutation
    rows.append((f"match(method='sparse', k={k})", mem.seconds, mem.cpu_seconds, mem.extra_gb))
    print(f"  sparse:   {mem.seconds:.1f} s ({mem.cpu_seconds:.1f} s CPU), +{mem.extra_gb:.2f} GiB", flush=True)
    recovered = {name: float((perm == truth).double().mean()) for name, perm in results.items()}
    agreement = {name: float((perm == results["exact"]).double().mean()) if "exact" in results else float("nan") for name, perm in results.items()}
    for name in results:
        print(f"  {name}: recovers the planted permutation on {recovered[name]:.4%} of features")
    if "exact" in results:  # where features lack a counterpart, exact's pairing of those is near arbitrary
        continuing = results["exact"] == truth
        for name, perm in results.items():
            same = float((perm == results["exact"])[continuing].double().mean())
            print(f"  {name}: agrees with exact on {same:.4%} of the {int(continuing.sum())} features exact matches to their planted partner")
    return [(*row, recovered[name], agreement[name]) for name, row in zip(results, rows, strict=True)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-features", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--wide-features", type=int, default=65536, help="0 skips the wide sparse-only pair")
    parser.add_argument("--noise", type=float, default=1.1, help="per-layer drift of the planted features (see synthetic.planted_chain)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--shared-fraction", type=float, default=1.0, help="features that continue to the next layer (see synthetic.planted_chain)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-exact", action="store_true", help="sparse only (e.g. to rerun it alone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, numpy {np.__version__}")

    rows = run_pair(
        args.n_features, args.d_model, args.noise, args.k, args.seed, not args.skip_baseline, not args.skip_exact, args.shared_fraction
    )
    table = [("pair", args.n_features, *row) for row in rows]
    if args.wide_features:
        wide = run_pair(args.wide_features, args.d_model, args.noise, args.k, args.seed, False, False, args.shared_fraction)
        table += [("wide", args.wide_features, *row) for row in wide]

    print("\n| pair | features | method | wall s | CPU s | peak extra GiB | recovered | agreement with exact |\n|---|---|---|---|---|---|---|---|")
    for kind, n, name, seconds, cpu, gib, rec, agree in table:
        agree = "n/a (no exact run)" if agree != agree else f"{agree:.2%}"
        print(f"| {kind} | {n} | {name} | {seconds:.1f} | {cpu:.1f} | {gib:.2f} | {rec:.2%} | {agree} |")
    by_name = {name: (seconds, cpu, gib) for kind, n, name, seconds, cpu, gib, _, _ in table if kind == "pair"}
    if "match(method='exact')" not in by_name:
        return
    exact = by_name["match(method='exact')"]
    sparse = next(v for name, v in by_name.items() if name.startswith("match(method='sparse'"))

    def ratios(slow, fast):
        return f"wall x{slow[0] / fast[0]:.2f}, CPU x{slow[1] / fast[1]:.2f}, peak memory x{slow[2] / max(fast[2], 1e-9):.2f}"

    if "scipy LSA, naive float64 cost" in by_name:
        print(f"\nbaseline / exact: {ratios(by_name['scipy LSA, naive float64 cost'], exact)}")
    print(f"exact / sparse: {ratios(exact, sparse)}")

if __name__ == "__main__":
    main()
