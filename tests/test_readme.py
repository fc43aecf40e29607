"""The README's test command is what CI runs, so the two cannot drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = next(line for line in ci_lines if line.startswith("./scripts/setup.sh"))
    assert command in (ROOT / "README.md").read_text()


def test_readme_names_the_demo_command():
    assert "./scripts/setup.sh && .venv/bin/milliwatt demo" in (ROOT / "README.md").read_text()
