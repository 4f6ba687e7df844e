"""The README's Python API examples run as written (issue 32: a refactor must not break
what a newcomer copies first)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_python_examples_run_as_written():
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    for code in blocks:
        out = io.StringIO()
        scope: dict = {}
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
        assert out.getvalue().strip(), "an example printed nothing"
        if "out" in scope and hasattr(scope["out"], "text"):
            assert scope["out"].text and scope["out"].stats.target_steps > 0
