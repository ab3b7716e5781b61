"""The tested environments are the ends of the declared ranges: .ci/run installs each environment under one
constraints file, and those files pin exactly the bounds pyproject.toml declares for torch and transformers."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _declared(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == name]
    return requirement


def _pinned(constraints: str) -> dict[str, Version]:
    text = (ROOT / ".ci" / constraints).read_text()
    return {name: Version(version) for name, version in re.findall(r"^([\w-]+)==(\S+)", text, re.M)}


def test_lowest_environment_pins_the_declared_lower_bounds():
    lowest = _pinned("constraints-lowest.txt")
    for name in ("torch", "transformers"):
        lower = [Version(s.version) for s in _declared(name).specifier if s.operator == ">="]
        assert lower == [lowest[name]], f"{name}: declared {_declared(name)}, CI's lowest environment pins {lowest}"


def test_newest_environment_pins_the_top_of_the_declared_ranges():
    newest, lowest = _pinned("constraints-newest.txt"), _pinned("constraints-lowest.txt")
    for name in ("torch", "transformers"):
        assert newest[name] in _declared(name).specifier and newest[name] > lowest[name], (name, newest, lowest)
    # Each is capped one minor above the newest release CI tests: a release above that is not promised.
    for name in ("torch", "transformers"):
        (cap,) = [Version(s.version) for s in _declared(name).specifier if s.operator == "<"]
        assert cap == Version(f"{newest[name].major}.{newest[name].minor + 1}"), (name, cap, newest[name])


def test_both_environments_pin_the_same_packages():
    assert _pinned("constraints-lowest.txt").keys() == _pinned("constraints-newest.txt").keys()
