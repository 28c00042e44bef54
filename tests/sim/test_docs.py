"""The Python API example in docs/sim.md runs and prints what the page says it prints."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "sim.md"


@pytest.mark.slow
def test_python_api_example_runs_as_documented() -> None:
    section = DOC.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    assert out.getvalue() == printed
