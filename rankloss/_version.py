"""The single place the package version is defined (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
