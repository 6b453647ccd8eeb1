"""The usage snippets in README.md run as written (offline, in a scratch folder)."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    failures = []
    for i, code in enumerate(json.load(open(sys.argv[1]))):
        try:
            exec(compile(code, f"README snippet {i}", "exec"), {"__name__": f"readme_{i}"})
        except Exception:
            failures.append(f"snippet {i}:\\n{code}\\n{traceback.format_exc()}")
    print("\\n\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def usage_snippets() -> list[str]:
    usage = README.read_text(encoding="utf-8").split("## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", usage, flags=re.S)


def test_readme_has_a_snippet_per_method():
    assert len(usage_snippets()) == 8


def test_readme_snippets_run(tmp_path):
    import json

    (tmp_path / "snippets.json").write_text(json.dumps(usage_snippets()))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, "snippets.json"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def _commands(text: str) -> list[str]:
    """The commands of a bash block, comments left out."""
    return [command for line in text.splitlines() if (command := line.split("#", 1)[0].strip())]


def test_ci_runs_the_readmes_install_and_test_commands_in_order():
    readme = README.read_text(encoding="utf-8")
    install = re.search(r"## Install\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    tests = re.search(r"Run the tests .*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert _commands(install) == ["pip install torch", 'pip install -e ".[test,demo]"']
    # CI installs torch as $TORCH_SPEC (default: the pinned CPU wheel; TORCH_SPEC=torch is the README's line)
    assert 'python -m pip install --quiet "$TORCH_SPEC"\npython -m pip install --quiet -e ".[test,demo]"\n' in ci
    assert _commands(tests) == [
        "python tests/peer/fetch_peer_tests.py", "python -m pytest", "python -m pytest -m slow",
    ]
    assert ci.rstrip().endswith("\n".join(_commands(tests)))
