"""Peak RSS and time of `interpolate_checkpoints` (streamed) vs loading both models and interpolating in memory.

A multi-shard checkpoint (about 2 GB by default) and a perturbed copy of it are generated in a
temporary folder; each contender then runs in its own subprocess, so that its peak RSS
(``VmHWM``) is its own. Dirty pages are flushed and the page cache is warmed before every run, so all
of them read from memory and start writing with nothing queued before them.

Rows:
- ``read inputs once``: every tensor of both checkpoints read once with ``safe_open`` (the time target's yardstick);
- ``copy one input``: every shard of ``base`` read and written back with ``save_file`` (the floor of writing
  one output: when the disk is slower than the page cache, writing dominates every streamed row);
- ``streamed``: ``interpolate_checkpoints(base, tuned, 0.5, out)``;
- ``streamed, 3 alphas``: the same with ``[0.25, 0.5, 2.0]``, one pass for all three outputs;
- ``in memory``: ``load_file`` both, ``interpolate_state_dict``, ``save_torch_state_dict`` (sharded);
- ``python + imports``: the same imports and nothing else (the RSS every row starts from).

Targets (the issue): streamed peak RSS <= 2 x largest shard + 300 MB; streamed time <= 2 x ``read inputs once``.

    python benchmarks/bench_interpolate.py                          # ~2 GB checkpoint, 500 MB shards
    python benchmarks/bench_interpolate.py --size-gb 0.2 --shard-mb 50   # quick
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TUNED_NOISE = 1e-2


def generate_checkpoint(folder: Path, size_gb: float, shard_mb: int, dtype: str, seed: int, noise_from: Path | None = None):
    """Square bf16/fp32 matrices (plus biases and an int64 buffer) in shards of about ``shard_mb``, with an index.

    With ``noise_from``, every floating tensor is that checkpoint's plus small noise (a "fine-tuned" copy).
    """
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    side = 2048
    per_matrix = side * side * torch_dtype.itemsize
    n_layers = max(2, int(size_gb * 1e9 // per_matrix))
    per_shard = max(1, int(shard_mb * 1e6 // per_matrix))
    generator = torch.Generator().manual_seed(seed)
    n_shards = -(-n_layers // per_shard)
    weight_map, total = {}, 0
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        if noise_from is not None:
            tensors = load_file(noise_from / file)
            for name, t in tensors.items():
                if t.is_floating_point():
                    tensors[name] = (t.float() + TUNED_NOISE * torch.randn(t.shape, generator=generator)).to(t.dtype)
        else:
            tensors = {}
            for i in range(s * per_shard, min(n_layers, (s + 1) * per_shard)):
                tensors[f"layers.{i}.weight"] = torch.randn(side, side, generator=generator).to(torch_dtype)
                tensors[f"layers.{i}.bias"] = torch.randn(side, generator=generator).to(torch_dtype)
            if s == 0:
                tensors["position_ids"] = torch.arange(4096)
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "architectures": ["BenchModel"]}))


# ------------------------------------------------------------------------------ child processes


def _child(mode: str, base: str, tuned: str, out: str, shard_size: int) -> dict:
    import torch  # noqa: F401  (every mode pays the same imports)
    from safetensors import safe_open

    from hf_ext.merging import interpolate_checkpoints, interpolate_state_dict

    start = time.perf_counter()
    if mode == "read":
        for folder in (base, tuned):
            for file in sorted(Path(folder).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        f.get_tensor(name).clone()  # get_tensor maps lazily; clone reads every byte
    elif mode == "copy":
        from safetensors.torch import load_file, save_file

        Path(out).mkdir()
        for file in sorted(Path(base).glob("*.safetensors")):
            save_file(load_file(file), Path(out) / file.name, metadata={"format": "pt"})
    elif mode == "streamed":
        interpolate_checkpoints(base, tuned, 0.5, out, shard_size=shard_size)
    elif mode == "streamed3":
        interpolate_checkpoints(base, tuned, [0.25, 0.5, 2.0], out, shard_size=shard_size)
    elif mode == "in_memory":
        from huggingface_hub import save_torch_state_dict
        from safetensors.torch import load_file

        def load(folder):
            state = {}
            for file in sorted(Path(folder).glob("*.safetensors")):
                state.update(load_file(file))
            return state

        merged = interpolate_state_dict(load(base), load(tuned), 0.5)
        Path(out).mkdir()
        save_torch_state_dict(merged, out, max_shard_size=shard_size)
    elif mode != "imports":
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process' high-water RSS (VmHWM). ``ru_maxrss`` is not used: Linux carries it over from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _warm_page_cache(*folders: Path) -> None:
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def _run_child(mode: str, base: Path, tuned: Path, out: Path, shard_size: int) -> dict:
    os.sync()  # the previous row's dirty pages would otherwise throttle this row's writes
    _warm_page_cache(base, tuned)
    cmd = [sys.executable, __file__, "--child", mode, str(base), str(tuned), str(out), str(shard_size)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each generated checkpoint (default: %(default)s)")
    parser.add_argument("--shard-mb", type=int, default=500, help="input and output shard size (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where to generate the checkpoints")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_interpolate_", dir=args.tmp))
    try:
        base, tuned = root / "base", root / "tuned"
        start = time.perf_counter()
        generate_checkpoint(base, args.size_gb, args.shard_mb, args.dtype, seed=0)
        generate_checkpoint(tuned, args.size_gb, args.shard_mb, args.dtype, seed=1, noise_from=base)
        largest_mb = max(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
        total_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        print(f"generated 2 x {total_gb:.2f} GB ({len(list(base.glob('*.safetensors')))} shards, largest {largest_mb:.0f} MB, "
              f"{args.dtype}) in {time.perf_counter() - start:.0f} s")
        shard_size = int(args.shard_mb * 1e6)
        rows = {}
        for mode, label in [("imports", "python + imports"), ("read", "read inputs once"), ("copy", "copy one input"),
                            ("streamed", "streamed"), ("streamed3", "streamed, 3 alphas"), ("in_memory", "in memory")]:
            rows[label] = _run_child(mode, base, tuned, root / "out", shard_size)
            print(f"  {label:<20} {rows[label]['seconds']:7.2f} s   peak RSS {rows[label]['peak_rss_mb']:7.0f} MB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    read, copy, streamed, memory = rows["read inputs once"], rows["copy one input"], rows["streamed"], rows["in memory"]
    rss_target = 2 * largest_mb + 300
    print()
    print("| run | time (s) | peak RSS (MB) | time / read inputs once | peak RSS / in memory |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | {row['seconds'] / read['seconds']:.2f} | "
              f"{row['peak_rss_mb'] / memory['peak_rss_mb']:.2f} |")
    print()
    print(f"streamed peak RSS {streamed['peak_rss_mb']:.0f} MB vs target 2 x {largest_mb:.0f} + 300 = {rss_target:.0f} MB: "
          f"{'met' if streamed['peak_rss_mb'] <= rss_target else 'MISSED'}")
    print(f"streamed time {streamed['seconds'] / read['seconds']:.2f} x reading both inputs once (target <= 2): "
          f"{'met' if streamed['seconds'] <= 2 * read['seconds'] else 'MISSED'}")
    print(f"streamed time {streamed['seconds'] / copy['seconds']:.2f} x copying one input (reading and writing one checkpoint)")
    print(f"streamed vs in memory: {memory['seconds'] / streamed['seconds']:.2f}x faster, "
          f"{memory['peak_rss_mb'] / streamed['peak_rss_mb']:.2f}x less peak RSS")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, base, tuned, out, shard_size = sys.argv[2:7]
        print(json.dumps(_child(mode, base, tuned, out, int(shard_size))))
    else:
        main()
