"""The wheel installs exactly one top-level package, ``rankloss``, with every subpackage of the source tree.

``kernels/`` and ``reference/`` live at the top of the repository and must install as
``rankloss.kernels`` and ``rankloss.reference`` (DESIGN.md §4); they are namespace folders (no
``__init__.py``, see tests/test_source_checkout.py), so the wheel holds their modules and no
``__init__.py`` for them. Packages are discovered from the source
tree, so a subpackage added later (e.g. ``rankloss/chains/``) but missing from pyproject's
``[tool.setuptools] packages`` list fails here with a message naming it.

The wheel is built from a copy of the working tree (the files a fresh clone would have, plus untracked
ones) so the build leaves no ``build/`` or ``*.egg-info`` behind in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rankloss

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as
SOURCE_ROOTS = {"rankloss": "rankloss", "kernels": "rankloss.kernels", "reference": "rankloss.reference"}
_SKIP_PARTS = {
    "__pycache__",
    ".git",
    "build",
    "dist",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".benchmarks",
}


def _source_packages() -> dict[str, Path]:
    """Every folder under the source roots that holds a ``.py`` file -> its installed package name."""
    found: dict[str, Path] = {}
    for folder, package in SOURCE_ROOTS.items():
        root = REPO / folder
        for py in sorted(root.rglob("*.py")):
            rel = py.parent.relative_to(root)
            if _SKIP_PARTS.intersection(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
                continue
            found[".".join([package, *rel.parts])] = py.parent
    return found


def _source_modules() -> dict[str, Path]:
    """Every ``.py`` file of the source roots -> its path inside the wheel."""
    out: dict[str, Path] = {}
    for folder, package in SOURCE_ROOTS.items():
        root = REPO / folder
        for py in sorted(root.rglob("*.py")):
            rel = py.relative_to(root)
            if _SKIP_PARTS.intersection(rel.parts):
                continue
            out[str(Path(*package.split("."), rel).as_posix())] = py
    return out


def _copy_source_tree(dest: Path) -> None:
    """Copy the files a clone would have (tracked and untracked, not ignored), else the tree minus builds."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(
            REPO,
            dest,
            ignore=shutil.ignore_patterns(*_SKIP_PARTS, "*.egg-info", ".venv", "venv"),
            dirs_exist_ok=True,
        )
        return
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    src.mkdir()
    _copy_source_tree(src)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    wheels = list(out.glob("rankloss-*.whl"))
    assert len(wheels) == 1, f"expected one rankloss wheel in {out}, got {os.listdir(out)}"
    return wheels[0]


def test_every_source_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    missing = {name: path for name, path in _source_packages().items() if name not in listed}
    assert not missing, "\n".join(
        f"package {name!r} (folder {path.relative_to(REPO)}/) is missing from [tool.setuptools] packages "
        f"in pyproject.toml: add {name!r} to that list"
        for name, path in missing.items()
    )
    for package, folder in {
        "rankloss": "rankloss",
        "rankloss.kernels": "kernels",
        "rankloss.reference": "reference",
    }.items():
        assert config["package-dir"].get(package) == folder, (
            f"[tool.setuptools] package-dir must map {package!r} to {folder!r}"
        )


def test_wheel_contents(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert len(dist_info) == 1, top_level
    assert top_level == {"rankloss", *dist_info}, (
        f"unexpected top-level entries: {top_level - {'rankloss', *dist_info}}"
    )
    assert "kernels" not in top_level and "reference" not in top_level
    for package in ("kernels", "reference"):
        assert any(n.startswith(f"rankloss/{package}/") and n.endswith(".py") for n in names), (
            f"the wheel holds no module of rankloss.{package}"
        )

    in_wheel = set(names)
    missing = [
        (wheel_path, src) for wheel_path, src in _source_modules().items() if wheel_path not in in_wheel
    ]
    packages = sorted({wheel_path.rsplit("/", 1)[0].replace("/", ".") for wheel_path, _ in missing})
    assert not missing, (
        f"the wheel lacks {len(missing)} source file(s), "
        f"e.g. {[str(s.relative_to(REPO)) for _, s in missing[:5]]}; "
        f"add {packages} to [tool.setuptools] packages in pyproject.toml"
    )


def test_wheel_version_is_package_version(wheel: Path):
    from packaging.version import Version

    version = wheel.name.split("-")[1]
    assert Version(version) == Version(rankloss.__version__), (wheel.name, rankloss.__version__)
    metadata = zipfile.ZipFile(wheel).read(f"rankloss-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata


def test_installed_wheel_imports_only_under_rankloss(wheel: Path, tmp_path: Path):
    """Unpacking a pure-Python wheel is installing it; run Python from an unrelated folder against it.

    Every file the installed distribution records lies under ``rankloss/`` or its ``.dist-info``, so it
    installs no top-level ``kernels`` or ``reference`` module. (Those names may still import: transformers
    5.x depends on Hugging Face's ``kernels`` package; they must just not come from rankloss.)
    ``rankloss``, ``rankloss.kernels``, ``rankloss.reference`` and every console script's target import
    from the unpacked wheel. From the repository root: tests/test_source_checkout.py.
    """
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import importlib, importlib.metadata, importlib.util, sys
from pathlib import Path
site = Path({str(site)!r}).resolve()

def inside(path):
    return site in Path(path).resolve().parents

dist = importlib.metadata.distribution("rankloss")
assert Path(dist.locate_file("")).resolve() == site, dist.locate_file("")
files = [str(f) for f in dist.files]
dist_info = next(site.glob("rankloss-*.dist-info")).name
outside = [f for f in files if f.split("/")[0] not in ("rankloss", dist_info)]
assert not outside, f"the installed distribution has files outside rankloss/: {{outside}}"
assert any(f.startswith("rankloss/kernels/") for f in files), files
assert any(f.startswith("rankloss/reference/") for f in files), files
top_level = dist.read_text("top_level.txt")
assert top_level is None or top_level.split() == ["rankloss"], top_level

import rankloss, rankloss.kernels, rankloss.reference, rankloss.reference.losses
assert inside(rankloss.__file__), rankloss.__file__
for mod in (rankloss.kernels, rankloss.reference):
    assert all(inside(p) for p in mod.__path__), (mod.__name__, list(mod.__path__))
assert inside(rankloss.reference.losses.__file__), rankloss.reference.losses.__file__
assert rankloss.reference.losses.plackett_luce_loss is not None
for name in ("chain_loss", "token_logprobs", "linear_token_logprobs"):
    spec = importlib.util.find_spec("rankloss.kernels." + name)
    assert spec is not None and inside(spec.origin), (name, spec)
# every console script of the wheel points at an importable callable
import configparser
entry_points = configparser.ConfigParser()
entry_points.read(site / dist_info / "entry_points.txt")
scripts = entry_points["console_scripts"] if entry_points.has_section("console_scripts") else dict()
for script, target in scripts.items():
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), (script, target)
# a top-level kernels or reference, if anything provides one here, is not rankloss's
for name in ("kernels", "reference"):
    spec = importlib.util.find_spec(name)
    places = [] if spec is None else [spec.origin] if spec.origin else list(spec.submodule_search_locations)
    assert not any(inside(p) for p in places), f"import {{name}} finds rankloss's files: {{places}}"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # before site-packages, so it wins over an editable install of the repo
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
