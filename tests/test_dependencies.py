"""pyproject.toml states ranges; requirements.lock pins what the README's commands install, inside them."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements():
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("kvcondense")]
    return reqs


def test_dependencies_are_ranges_not_pins():
    for req in _requirements():
        assert not any(spec.operator == "==" for spec in req.specifier), f"{req} is a pin; give a range"
        assert req.specifier, f"{req} has no lower bound"


def test_the_lock_pins_every_dependency_inside_its_range():
    pins = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} is outside {req}"


def test_eval_and_plot_libraries_are_an_extra():
    core = {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]}
    assert not core & {"matplotlib", "rouge-score", "bert-score", "pandas", "nltk"}


def test_the_installed_versions_are_the_locked_ones():
    """The venv the tests run in was installed from the lock (make setup): what CI tests is what the lock says."""
    from importlib.metadata import distributions

    pins = _lock()
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and name != "kvcondense":
            assert Version(dist.version.split("+")[0]) == pins[name], f"{name} {dist.version} != lock {pins[name]}"
