"""The runnable examples run: examples/chain_losses_demo.py prints a line per loss, all finite."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import rankloss

REPO = Path(__file__).resolve().parents[1]


def test_chain_losses_demo(tmp_path: Path):
    script = REPO / "examples" / "chain_losses_demo.py"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    for loss in rankloss.CHAIN_LOSSES:
        rows = [line for line in lines if line.split()[0] == loss]
        assert rows, f"no line for loss {loss!r} in the demo's output:\n{result.stdout}"
        for row in rows:
            numbers = [float(tok) for tok in row.split() if _is_number(tok)]
            assert numbers, row
            assert all(math.isfinite(v) for v in numbers), row
    assert not re.search(r"\b(nan|inf)\b", result.stdout, flags=re.IGNORECASE), result.stdout


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
