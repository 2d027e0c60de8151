"""environment.yml (conda) and pyproject.toml (pip) must describe the same install."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _as_map(lines):
    requirements = {}
    for line in lines:
        requirement = Requirement(line)
        assert requirement.name not in requirements, f"{requirement.name} listed twice"
        requirements[requirement.name.lower().replace("_", "-")] = requirement.specifier
    return requirements


def test_environment_lists_the_pyproject_dependencies_with_the_same_pins():
    project = _pyproject()["project"]
    expected = _as_map(project["dependencies"] + project["optional-dependencies"]["notebooks"]
                       + project["optional-dependencies"]["dev"])
    pip_section = next(item["pip"] for item in _environment()["dependencies"] if isinstance(item, dict))
    listed = _as_map([line for line in pip_section if not line.startswith("-")])
    assert listed == expected


def test_environment_python_satisfies_requires_python():
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    conda = [d for d in _environment()["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert len(conda) == 1
    assert conda[0].split("=", 1)[1] + ".0" in requires
    assert _environment()["channels"] == ["conda-forge"]


def test_torch_is_pinned_to_the_cpu_build_everywhere():
    constraints = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line and not line.startswith("#")]
    assert "torch==2.13.0" in constraints
    assert "torch==2.13.0" in _pyproject()["project"]["dependencies"]
    # every install command in the Makefile and CI goes through the constraints file
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
