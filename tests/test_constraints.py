"""constraints.txt fixes what the README's commands and CI install (pyproject.toml's ranges stay open).

Both README commands install with ``-c constraints.txt``; the file pins one exact release of every
distribution that ``rankloss[dev]`` pulls in here (found from the installed metadata), so a dependency
added to pyproject.toml without a pin fails here instead of floating with upstream releases.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"


def _pins() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt:{number}: {line!r} is not one exact pin (name==version)"
        )
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{number}: {req.name} is pinned twice"
        pins[name] = req
    return pins


def _dependency_closure(root: str, extras: set[str]) -> set[str]:
    """Names of every distribution ``root[extras]`` requires here, transitively (markers evaluated)."""
    env = default_environment()
    names: set[str] = set()
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # required but not installed: still pinned below, nothing to recurse into
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": extra}) for extra in (wanted or {""})
            ):
                continue
            dep = canonicalize_name(req.name)
            if dep != canonicalize_name(root):
                names.add(dep)
            todo.append((dep, frozenset(req.extras)))
    return names


@pytest.mark.parametrize("marker", ["<!-- main-command -->", "<!-- test-command -->"])
def test_readme_commands_install_with_the_constraints(marker):
    text = (REPO / "README.md").read_text()
    (command,) = re.findall(re.escape(marker) + r"\n```bash\n(.*?)\n```", text, flags=re.DOTALL)
    assert re.search(r"pip install -c constraints\.txt '\.\[(train|dev)\]'", command), (
        f"the README command after {marker} must install with -c constraints.txt: {command!r}"
    )


def test_constraints_pin_every_dependency_of_the_dev_extra():
    try:
        importlib.metadata.distribution("rankloss")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rankloss is not installed here (run from a bare checkout): no metadata to walk")
    needed = _dependency_closure("rankloss", {"dev"})
    assert {"torch", "transformers", "pytest"} <= needed, sorted(needed)
    pins = _pins()
    missing = sorted(needed - set(pins))
    assert not missing, (
        f"constraints.txt does not pin {missing}, which rankloss[dev] installs here: run "
        "`bash .ci/update-constraints` and commit constraints.txt"
    )
    assert "rankloss" not in pins, "constraints.txt must not pin rankloss itself"
