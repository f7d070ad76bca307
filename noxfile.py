"""Development sessions: ``nox`` runs tests, lint, typing and docs; ``nox -s NAME`` one.

Every session runs on the interpreter nox itself runs on (``nox -P 3.12 -s tests`` picks
another). Sessions install with pip; venvs are reused between runs.
"""

from __future__ import annotations

from pathlib import Path

import nox
from packaging.requirements import Requirement

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint", "typing", "docs"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
# examples/ may be empty, and git does not keep empty directories.
CODE = [
    p
    for p in ["monte_trio", "tests", "examples", "benchmarks", "noxfile.py", "docs/conf.py"]
    if (ROOT / p).exists()
]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (the soak test runs at its small default size)."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


def lowest_pins(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    """Pin every dependency (and those of ``extras``) to its declared floor: ``NAME==FLOOR``.

    Every requirement must have exactly one ``>=`` floor; a marker is kept.

    Raises:
        ValueError: if a requirement has no floor, or more than one lower bound.
    """
    project = pyproject["project"]
    assert isinstance(project, dict)
    specs: list[str] = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    pins = []
    for spec in specs:
        req = Requirement(spec)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if len(floors) != 1:
            raise ValueError(f"{spec!r} in pyproject.toml needs exactly one '>=' floor")
        marker = f"; {req.marker}" if req.marker else ""
        pins.append(f"{req.name}=={floors[0]}{marker}")
    return pins


@nox.session
def lowest(session: nox.Session) -> None:
    """Run the test suite on exactly the lowest versions pyproject.toml declares.

    The constraints file pins each direct dependency (and the ``test`` extra) to its floor;
    their own dependencies resolve as usual. Extra arguments go to pytest.
    """
    pins = lowest_pins(nox.project.load_toml("pyproject.toml"), ["test"])
    constraints = Path(session.create_tmp()) / "constraints-lowest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.log("pins: %s", ", ".join(pins))
    session.install("-c", str(constraints), ".[test]")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", *CODE)
    session.run("ruff", "format", "--check", *CODE)


@nox.session
def typing(session: nox.Session) -> None:
    """Type-check the library, tests, examples and benchmarks (files in pyproject.toml)."""
    session.install(".[test]", "mypy")
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML docs into docs/_build/html; every warning is an error."""
    session.install(".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark suite and write docs/benchmarks.rst, its plot and JSON.

    `nox -s bench -- --quick` for a smoke run (its page then shows that run).
    """
    session.install(".[bench]")
    session.run(
        "python", "-m", "benchmarks",
        "--json", "docs/_static/benchmarks.json",
        "--plot", "docs/_static/benchmarks.png",
        "--rst", "docs/benchmarks.rst",
        *session.posargs,
    )  # fmt: skip


@nox.session
def fuzz(session: nox.Session) -> None:
    """Run the mutation fuzzer over every decoder: `nox -s fuzz -- --seconds 600`."""
    session.install(".[test]")
    session.run("python", "tests/fuzz_target.py", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Run the long soak tests (tests marked soak)."""
    session.install(".[test]")
    session.run("pytest", "-m", "soak", *session.posargs)
