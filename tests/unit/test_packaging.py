"""A wheel of l3train carries every C source the package compiles on first use (the LZW trie,
the CPU kernel, the row-sparse AdamW, the shared-memory signals): an editable install reads
them from the checkout, a wheel only has what pyproject.toml's package data lists."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_c_source_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    sources = sorted((REPO / "l3train").rglob("*.c"))
    assert sources
    for source in sources:
        package = ".".join(source.parent.relative_to(REPO).parts)
        patterns = package_data.get(package, [])
        assert any(fnmatch.fnmatch(source.name, pattern) for pattern in patterns), (
            f"{source.relative_to(REPO)} is not in [tool.setuptools.package-data] {package!r}")
