"""The README's examples really run and print what the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def quickstart() -> tuple[str, str]:
    """The README's first Python example and the output block right after it."""
    text = (HERE / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```\n\n```\n(.*?)```", text, re.DOTALL)
    assert match, "the README's quickstart example or its output block is missing"
    return match.group(1), match.group(2)


def test_readme_quickstart_prints_what_the_readme_shows_on_every_run(tmp_path: Path) -> None:
    code, shown = quickstart()
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for _ in range(2):  # the second run finds order-1 in the journal
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout == shown
    assert (tmp_path / "quickstart.db").exists()


@pytest.mark.postgres_only
def test_readme_quickstart_prints_the_same_on_postgres(tmp_path: Path, db: str) -> None:
    # "Nothing else in the code changes": the same example, on a PostgreSQL URL.
    code, shown = quickstart()
    assert 'Durable("quickstart.db")' in code
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace('Durable("quickstart.db")', f"Durable({db!r})"))
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout == shown
    # And the section's own example: those URLs make a Durable (it connects at open).
    section = (HERE / "README.md").read_text().split("## When you outgrow one machine")[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example
    exec(compile("from durable import Durable\n" + example.group(1), "README", "exec"), {})
