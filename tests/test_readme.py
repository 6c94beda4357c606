"""The README stays true: its runnable Python blocks run, and its two commands are where CI looks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks_after(marker: str, text: str) -> list[str]:
    pattern = re.escape(marker) + r"[^\n]*\n```(?:python|bash)\n(.*?)\n```"
    return re.findall(pattern, text, flags=re.DOTALL)


def test_runnable_python_blocks_run():
    blocks = _blocks_after("<!-- runnable", README.read_text())
    assert blocks, "README has no block marked <!-- runnable -->"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("marker", ["<!-- main-command -->", "<!-- test-command -->"])
def test_the_two_commands_are_present(marker):
    (command,) = _blocks_after(marker, README.read_text())
    assert "pip install" in command
