"""Sessions for tests, lint, docs and benchmarks: `nox -l` lists them."""

from __future__ import annotations

import nox
from packaging.requirements import Requirement

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch: a plain `torch` requirement would pull a multi-GB CUDA
# build. On a GPU machine, install the torch you need before `pip install -e .`.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str = "test") -> None:
    """Install the CPU torch first, then the project with its extras (editable)."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite; pytest arguments go after `--` (e.g. `-m 'not slow'`)."""
    install(session)
    session.run("pytest", *session.posargs)


def lowest_pins() -> list[str]:
    """`name==X` for each direct dependency `name>=X` of pyproject.toml, torch excepted.

    torch stays at TORCH: older CPU builds of torch come only from PyTorch's own
    index, and PyPI's are multi-GB CUDA builds, so its lower bound is not tested here.
    """
    pins = []
    for line in nox.project.load_toml("pyproject.toml")["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "torch":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (lowest,) = (spec.version for spec in requirement.specifier if spec.operator == ">=")
        pins.append(f"{requirement.name}=={lowest}")
    return pins


@nox.session(default=False)
def lowest(session: nox.Session) -> None:
    """Fast tests with the lowest versions pyproject.toml allows (torch excepted)."""
    pins = lowest_pins()
    constraints = f"{session.create_tmp()}/lowest.txt"
    with open(constraints, "w") as handle:
        handle.write("\n".join(pins) + "\n")
    # torch alone first, as in `install`: resolving it together with the pins lets
    # pip fall back to PyPI's CUDA build of the same version when it backtracks.
    session.install(TORCH)
    session.install(*pins)
    # The test extras may not lift a pinned dependency: the pins are constraints here.
    session.install("-c", constraints, "-e", ".[test]")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


# The documentation site (mkdocs.yml). mkdocstrings reads the public API's
# docstrings statically (griffe, from the source folders), so neither the project
# nor torch is installed here. mkdocs stays below 2: the Material theme and
# mkdocstrings are built for mkdocs 1.
DOCS = [
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.6",
    "mkdocstrings>=1.0",
    "mkdocstrings-python>=2.0",
    "ruff",  # mkdocstrings formats long signatures with it
]


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/; a broken link or anchor fails (--strict)."""
    session.install(*DOCS)
    # NO_MKDOCS_2_WARNING: Material prints an end-of-life notice about mkdocs 2 otherwise.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against references measured in the same run (`-- --quick` for a smoke run)."""
    install(session)
    for script in (
        "bench_training.py",
        "bench_memory.py",
        "bench_prepare.py",
        "bench_sampling.py",
        "bench_finetune.py",
        "bench_serve.py",
        "bench_eval.py",
        "bench_estimates.py",
        "bench_recipe.py",
    ):
        session.run("python", f"tests/bench/{script}", *session.posargs)
