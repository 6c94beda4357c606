"""Python started in the repository root: the checkout's folders come first on ``sys.path``.

``python -c``, ``python -m rankloss``, a REPL or a notebook started in the repository root put that folder
before site-packages. ``kernels/`` and ``reference/`` live there (they install as ``rankloss.kernels`` and
``rankloss.reference``), so they must not hide installed packages of the same names: transformers 5.x
imports Hugging Face's ``kernels`` package to build any model. Both folders are namespace folders (no
``__init__.py``): Python keeps searching ``sys.path`` and a regular package found later wins, while
``rankloss`` itself still finds them as its ``kernels`` and ``reference`` subpackages.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python_in_repo_root(code: str, *, pythonpath: Path | None = None, timeout: float = 180):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_top_level_folders_do_not_hide_installed_packages(tmp_path: Path):
    """Regular packages named ``kernels`` and ``reference`` later on ``sys.path`` than the root win."""
    site = tmp_path / "site"
    for name in ("kernels", "reference"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"OWNER = 'installed {name}'\n")
    result = _python_in_repo_root(
        "import sys, kernels, reference\n"
        "assert sys.path[0] == '', sys.path[:3]\n"
        "print(kernels.OWNER, '|', reference.OWNER)",
        pythonpath=site,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "installed kernels | installed reference", (
        f"from the repository root, `import kernels` / `import reference` gave {result.stdout.strip()!r} "
        "instead of the installed packages: kernels/ and reference/ must stay namespace folders (no "
        f"__init__.py) so that they do not hide packages of the same names\n{result.stderr}"
    )


def test_rankloss_finds_its_subpackages_from_the_repository_root():
    result = _python_in_repo_root(
        "import importlib.util, rankloss, rankloss.reference.losses, rankloss.reference.logprobs\n"
        "print(rankloss.__file__)\n"
        "print(rankloss.reference.losses.__file__)\n"
        "print(rankloss.reference.logprobs.__file__)\n"
        "for name in ('chain_loss', 'token_logprobs', 'linear_token_logprobs'):\n"
        "    print(importlib.util.find_spec('rankloss.kernels.' + name).origin)\n"
    )
    assert result.returncode == 0, result.stderr
    got = [Path(line).resolve() for line in result.stdout.split()]
    assert got == [
        REPO / "rankloss" / "__init__.py",
        REPO / "reference" / "losses.py",
        REPO / "reference" / "logprobs.py",
        REPO / "kernels" / "chain_loss.py",
        REPO / "kernels" / "token_logprobs.py",
        REPO / "kernels" / "linear_token_logprobs.py",
    ], result.stdout


def test_transformers_model_builds_from_the_repository_root():
    """transformers imports Hugging Face's ``kernels`` package while it builds a model."""
    pytest.importorskip("transformers")
    result = _python_in_repo_root(
        "import importlib.util, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                     num_attention_heads=2)\n"
        "model = LlamaForCausalLM(config)\n"
        "print('x'.join(map(str, model(torch.tensor([[1, 2, 3]])).logits.shape)))\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec is not None else 'none')\n"
    )
    assert result.returncode == 0, (
        f"building a transformers model with the repository root as the working folder failed:\n"
        f"{result.stderr[-3000:]}"
    )
    shape, kernels_origin = result.stdout.split()
    assert shape == "1x3x50", result.stdout
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # a transformers release without the kernels dependency: nothing else to compare
    expected = Path(installed.locate_file("kernels/__init__.py")).resolve()
    assert kernels_origin != "none" and Path(kernels_origin).resolve() == expected, (
        f"from the repository root `kernels` resolved to {kernels_origin}, not the installed {expected}"
    )
