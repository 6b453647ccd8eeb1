"""`hf-ext demo`: each method's claim, in miniature, on the CPU.

A method adds its section with one registration in its own module ``hf_ext/demo/<method>.py``::

    from hf_ext.demo import DemoContext, SectionResult, register_section

    @register_section("based", title="Based vs ReBased on mini MQAR")
    def run(ctx: DemoContext) -> SectionResult:
        ...
        return SectionResult(claim="ReBased recalls better than Based", metrics={"acc_rebased": 0.9})

The runner (:mod:`hf_ext.demo.runner`) imports every module of this package, so nothing else has to
be edited. A section gets a `DemoContext` (its own output folder, a seed, a progress logger) and
must finish in well under a minute on a 2-core CPU: all sections together have a 5-minute budget.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SectionResult:
    """What a demo section reports.

    Args:
        claim: one sentence naming the paper's claim this section checks in miniature.
        metrics: the headline numbers, in the order they should be shown.
        table: optional detailed rows (one dict a row, the same keys in each) for the report.
        figures: file names of the PNG plots the section wrote into its output folder.
        notes: a short remark for the report (what the miniature does not show, say).
    """

    claim: str
    metrics: dict[str, float | int | str]
    table: list[dict] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: str = ""


@dataclass
class DemoContext:
    """What the runner hands a section: its output folder, a seed, and a progress logger."""

    name: str
    out_dir: Path
    seed: int = 0
    log: Callable[[str], None] = print

    def figure_path(self, filename: str) -> Path:
        """Where to save a plot so that the report finds it."""
        return self.out_dir / filename


@dataclass(frozen=True)
class DemoSection:
    name: str
    title: str
    fn: Callable[[DemoContext], SectionResult]


_SECTIONS: dict[str, DemoSection] = {}


def register_section(name: str, *, title: str) -> Callable:
    """Register the decorated function as the demo section ``name`` (idempotent on re-import)."""

    def decorator(fn: Callable[[DemoContext], SectionResult]) -> Callable[[DemoContext], SectionResult]:
        existing = _SECTIONS.get(name)
        if existing is not None and existing.fn.__module__ != fn.__module__:
            raise ValueError(f"Demo section {name!r} is already registered by {existing.fn.__module__}.")
        _SECTIONS[name] = DemoSection(name=name, title=title, fn=fn)
        return fn

    return decorator


def unregister_section(name: str) -> None:
    """Remove the section ``name`` (for tests that register their own)."""
    _SECTIONS.pop(name, None)


def registered_sections() -> dict[str, DemoSection]:
    """The registered sections, by name, in registration order."""
    return dict(_SECTIONS)


__all__ = ["DemoContext", "DemoSection", "SectionResult", "register_section", "registered_sections", "unregister_section"]
