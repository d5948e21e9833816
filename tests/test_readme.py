"""The README's promises that can be checked mechanically."""

from __future__ import annotations

from pathlib import Path

from lorafam.adapters import VARIANTS
from lorafam.reference import BEGIN, END, reference

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_recipe_reference_matches_the_schema():
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference(), "README is stale: paste the output of `python -m lorafam.reference`"


def test_every_variant_is_in_the_variants_table():
    for name in VARIANTS:
        assert f"| `{name}` |" in README, name


def test_ci_runs_the_readme_test_command():
    command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert f"```bash\n{command}\n```" in README
    assert command in (ROOT / ".ci" / "run").read_text()
    assert "```bash\nbash scripts/setup.sh && .venv/bin/lorafam train recipes/quickstart.yaml\n```" in README
