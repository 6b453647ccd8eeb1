"""The runner behind `hf-ext demo`: discover sections, run them, print a table, write a report."""

import argparse
import importlib
import pkgutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from hf_ext.demo import DemoContext, SectionResult, registered_sections

_NOT_SECTIONS = {"runner"}


def discover_sections() -> list[str]:
    """Import every section module of ``hf_ext.demo`` and return the registered names."""
    import hf_ext.demo as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_SECTIONS and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return list(registered_sections())


@dataclass
class SectionRun:
    name: str
    title: str
    seconds: float
    result: SectionResult | None
    error: str | None = None


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run_sections(names: list[str] | None, out_dir: Path, seed: int = 0, log=print) -> list[SectionRun]:
    """Run the named sections (all when ``names`` is None) and return their runs.

    A section that raises is recorded as failed with its traceback; the others still run.

    Raises:
        ValueError: a name in ``names`` is not a registered section.
    """
    sections = registered_sections()
    if names:
        unknown = [n for n in names if n not in sections]
        if unknown:
            raise ValueError(f"Unknown demo section(s) {unknown}; available: {sorted(sections)}.")
        sections = {n: sections[n] for n in names}
    runs = []
    for i, section in enumerate(sections.values(), 1):
        section_dir = out_dir / section.name
        section_dir.mkdir(parents=True, exist_ok=True)
        log(f"[{i}/{len(sections)}] {section.name}: {section.title}")
        ctx = DemoContext(name=section.name, out_dir=section_dir, seed=seed, log=lambda msg, n=section.name: log(f"    {n}: {msg}"))
        start = time.perf_counter()
        try:
            result, error = section.fn(ctx), None
        except Exception:  # a failing section must not hide the others' results
            result, error = None, traceback.format_exc()
        seconds = time.perf_counter() - start
        runs.append(SectionRun(section.name, section.title, seconds, result, error))
        status = "failed" if error else _format_metrics(result.metrics)
        log(f"    done in {seconds:.1f}s: {status}")
    return runs


def format_table(runs: list[SectionRun]) -> str:
    """A markdown table: one row a section, with its time, status and headline metrics."""
    lines = ["| section | seconds | status | headline |", "|---|---|---|---|"]
    for run in runs:
        status = "failed" if run.error else "ok"
        headline = "" if run.result is None else _format_metrics(run.result.metrics)
        lines.append(f"| {run.name} | {run.seconds:.1f} | {status} | {headline} |")
    return "\n".join(lines)


def write_report(runs: list[SectionRun], out_dir: Path) -> Path:
    """Write ``out_dir/report.md``: the summary table, then each section's claim, numbers and plots."""
    parts = ["# hf_ext demo report", "", format_table(runs), ""]
    for run in runs:
        parts += [f"## {run.name}: {run.title}", ""]
        if run.error:
            parts += ["Failed:", "", "```", run.error.rstrip(), "```", ""]
            continue
        result = run.result
        parts += [f"**Claim.** {result.claim}", "", _format_metrics(result.metrics), ""]
        if result.table:
            keys = list(result.table[0])
            parts += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for row in result.table:
                cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
        parts += [f"![{fig}]({run.name}/{fig})" for fig in result.figures]
        if result.notes:
            parts += ["", result.notes]
        parts.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this section (repeatable)")
    parser.add_argument("--out", default="hf_ext_demo_report", help="report folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed handed to every section (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default: %(default)s; the tiny models run fastest on one, and it keeps a shared machine responsive)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `hf-ext demo`; returns the exit code (1 if any section failed)."""
    import torch

    discover_sections()
    sections = registered_sections()
    if args.list:
        for name, section in sections.items():
            print(f"{name}: {section.title}")
        return 0
    if args.threads < 1:
        raise ValueError(f"`--threads` must be >= 1, got {args.threads}.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        runs = run_sections(args.only, out_dir, seed=args.seed)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process may go on (tests call this in-process)
    report = write_report(runs, out_dir)
    print()
    print(format_table(runs))
    print(f"\n{len(runs)} section(s) in {time.perf_counter() - start:.1f}s; report: {report}")
    return 1 if any(r.error for r in runs) else 0


__all__ = ["discover_sections", "format_table", "run", "run_sections", "write_report"]
