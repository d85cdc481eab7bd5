"""Sessions for tests, lint and benchmarks: `nox -l` lists them."""

from __future__ import annotations

import nox

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


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against references measured in the same run (`-- --quick` for a smoke run)."""
    install(session)
    for script in ("bench_training.py", "bench_prepare.py", "bench_sampling.py"):
        session.run("python", f"tests/bench/{script}", *session.posargs)
