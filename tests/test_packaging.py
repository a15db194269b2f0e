"""The package list in pyproject.toml is complete, and a wheel carries the shipped weights."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def listed_packages() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "chorus").rglob("__init__.py")}
    assert found | {"chorus.weights"} == set(listed_packages())


def test_wheel_carries_the_weights(tmp_path):
    """`pip wheel .` (no deps, no network) holds chorus/weights/* next to the code (~30 s: builds a wheel)."""
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"chorus/weights/" + str(p.relative_to(ROOT / "weights")) for p in (ROOT / "weights").rglob("*")
               if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")}
    assert shipped and shipped <= names
    assert "chorus/world/data/benchmark.jsonl" in names and "chorus/paths.py" in names
