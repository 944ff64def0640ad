"""The Lua scripts: files that state their contract, shipped with the package, loaded by name."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

from common.scripts import source

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("*/lua/*.lua"))


def test_there_are_scripts() -> None:
    assert {p.parent.parent.name for p in SCRIPTS} == {"common", "gateway"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_each_script_opens_with_its_contract(path: Path) -> None:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "KEYS[1]" in text, f"{path} does not state its KEYS"
    assert "Returns" in text, f"{path} does not state what it returns"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_each_script_is_package_data_and_loads_by_name(path: Path) -> None:
    package = path.parent.parent.name
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(f"lua/{path.name}", pattern) for pattern in data.get(package, []))
    loaded = source(path.stem, package)
    assert "@include" not in loaded
    assert loaded.startswith(path.read_text().partition("-- @include")[0])


INCLUDES = sorted(ROOT.glob("*/lua/include/*.lua"))


@pytest.mark.parametrize("path", INCLUDES, ids=lambda p: p.stem)
def test_each_include_is_package_data_and_written_once(path: Path) -> None:
    package = path.parent.parent.parent.name
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(f"lua/include/{path.name}", pattern) for pattern in data.get(package, []))
    users = [p for p in SCRIPTS if f"-- @include {path.stem}\n" in p.read_text()]
    assert users, f"nothing includes {path}"
    code = path.read_text().split("\n\n", 1)[1]  # below the opening comment that says who includes it
    for user in users:
        loaded = source(user.stem, user.parent.parent.name)
        assert loaded.count(code) == 1, f"{user.name} does not carry {path.name} in place of its @include line"


def test_an_unknown_script_is_an_error() -> None:
    with pytest.raises(FileNotFoundError):
        source("no-such-script")
