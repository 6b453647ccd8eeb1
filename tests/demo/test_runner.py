"""The demo runner, with sections registered by the test itself."""

import pytest

from hf_ext.cli import main
from hf_ext.demo import SectionResult, register_section, registered_sections, unregister_section
from hf_ext.demo.runner import discover_sections, run_sections, write_report


@pytest.fixture
def sections():
    names = ["test_ok", "test_broken"]

    @register_section("test_ok", title="a section that works")
    def ok(ctx):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ctx.log("half way")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        fig.savefig(ctx.figure_path("line.png"))
        plt.close(fig)
        return SectionResult(claim="two is more than one", metrics={"ratio": 2.0, "seed": ctx.seed},
                             table=[{"x": 1, "y": 0.5}, {"x": 2, "y": 0.25}], figures=["line.png"])

    @register_section("test_broken", title="a section that fails")
    def broken(ctx):
        raise RuntimeError("boom")

    yield names
    for name in names:
        unregister_section(name)


def test_sections_run_and_the_report_has_claims_numbers_and_plots(sections, tmp_path):
    logs = []
    runs = run_sections(["test_ok"], tmp_path, seed=7, log=logs.append)
    assert [r.name for r in runs] == ["test_ok"] and runs[0].error is None
    assert runs[0].result.metrics == {"ratio": 2.0, "seed": 7}
    assert logs[0] == "[1/1] test_ok: a section that works"
    assert "    test_ok: half way" in logs
    report = write_report(runs, tmp_path).read_text()
    assert "| test_ok |" in report and "ratio=2" in report
    assert "**Claim.** two is more than one" in report
    assert "| 2 | 0.25 |" in report
    assert "![line.png](test_ok/line.png)" in report
    assert (tmp_path / "test_ok" / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_section_does_not_stop_the_others(sections, tmp_path):
    runs = run_sections(["test_broken", "test_ok"], tmp_path, log=lambda _: None)
    assert "RuntimeError: boom" in runs[0].error
    assert runs[1].error is None


def test_cli_exit_codes(sections, tmp_path, capsys):
    assert main(["demo", "--only", "test_ok", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| test_ok |" in out and (tmp_path / "report.md").is_file()
    assert main(["demo", "--only", "test_ok", "--only", "test_broken", "--out", str(tmp_path)]) == 1
    assert main(["demo", "--only", "no_such_section", "--out", str(tmp_path)]) == 2
    assert "Unknown demo section(s) ['no_such_section']" in capsys.readouterr().err
    assert main(["demo", "--only", "test_ok", "--threads", "0", "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()  # refused before anything is written
    assert "`--threads` must be >= 1, got 0." in capsys.readouterr().err


def test_list_and_discovery(sections, capsys):
    discovered = discover_sections()
    assert "test_ok" in discovered and set(discovered) == set(registered_sections())
    assert main(["demo", "--list"]) == 0
    assert "test_ok: a section that works" in capsys.readouterr().out


def test_registering_a_name_twice_from_another_module_fails(sections):
    def other(ctx):
        return None

    other.__module__ = "somewhere.else"
    with pytest.raises(ValueError, match="already registered"):
        register_section("test_ok", title="again")(other)
