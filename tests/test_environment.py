"""The conda environment and the pip set-up must install the same pinned versions."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    name, _, version = req.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    return {_norm(r) for r in reqs}


def _conda_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_norm(r) for r in pip if not r.startswith("-e")}


def test_every_dependency_is_pinned():
    for req in _pyproject_pins():
        assert re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.+]*", req), f"unpinned or malformed requirement: {req}"


def test_conda_environment_matches_pyproject():
    pyproject, conda = _pyproject_pins(), _conda_pins()
    assert pyproject == conda, (f"only in pyproject.toml: {sorted(pyproject - conda)}; "
                                f"only in environment.yml: {sorted(conda - pyproject)}")


def test_no_deps_packages_agree_between_makefile_and_environment():
    make = re.search(r"^NODEPS_PINS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    env = re.search(r"^# no-deps:\s*(.+)$", (ROOT / "environment.yml").read_text(), re.M).group(1).split()
    assert sorted(map(_norm, make)) == sorted(map(_norm, env))


def test_torch_is_the_cpu_pin():
    assert "torch==2.13.0" in _pyproject_pins()
