"""Development sessions: ``nox`` runs the matrix; ``nox -s NAME`` runs one session.

``tests`` runs on every Python from 3.10 to 3.13 that nox finds on ``PATH`` (as
``python3.X``) and skips, with a message, the ones it does not find; ``nox -P 3.12 -s tests``
runs one of them. ``lowest`` runs on the lowest of those Pythons; the other sessions run on
the interpreter nox itself runs on. Sessions install with pip; venvs are reused between runs.
The Python versions are never downloaded: install them (pyenv, the OS) and put them on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nox
from packaging.requirements import Requirement

# 2025.10.14 added download_python.
nox.needs_version = ">=2025.10.14"
nox.options.sessions = ["tests", "lowest", "lint", "typing", "docs", "coverage"]
nox.options.reuse_venv = "yes"
# nox errors on a missing interpreter when CI is set; the matrix runs what the machine has.
nox.options.error_on_missing_interpreters = False
nox.options.download_python = "never"

ROOT = Path(__file__).parent
# examples/ may be empty, and git does not keep empty directories.
CODE = [
    p
    for p in ["monte_trio", "tests", "examples", "benchmarks", "noxfile.py", "docs/conf.py"]
    if (ROOT / p).exists()
]

# Every Python the package supports (requires-python and the classifiers in pyproject.toml).
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

# The public API's type completeness that `pyright --verifytypes` must reach, in percent:
# the score measured when this check was added (89.8%, 30 names short of a known type),
# rounded down. Raise it as names get typed; at 100 no regression passes.
PYRIGHT_FLOOR = 89.0


def _runs(version: str) -> bool:
    """Whether ``python{version}`` is on PATH and starts (a pyenv shim may not)."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return True
    exe = shutil.which(f"python{version}")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "-c", ""], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# The lowest supported Python found (the first of PYTHONS if none is: nox then skips).
LOWEST_PYTHON = next((v for v in PYTHONS if _runs(v)), PYTHONS[0])


@nox.session(python=PYTHONS)
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


@nox.session(python=LOWEST_PYTHON)
def lowest(session: nox.Session) -> None:
    """Run the test suite on exactly the lowest versions pyproject.toml declares.

    It runs on the lowest supported Python found. The constraints file pins each direct
    dependency (and the ``test`` extra) to its floor; their own dependencies resolve as
    usual. Extra arguments go to pytest.
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


def completeness(output: str) -> tuple[float, list[str]]:
    """Read ``pyright --verifytypes --outputjson`` output: the score (percent) and findings.

    The JSON may follow lines that pyright's installer printed first.

    Raises:
        ValueError: if the output holds no pyright report.
    """
    start = output.find("{")
    if start < 0:
        raise ValueError(f"pyright printed no JSON report:\n{output}")
    report, _ = json.JSONDecoder().raw_decode(output, start)
    types = report["typeCompleteness"]
    findings = []
    for symbol in types["symbols"]:
        for diagnostic in symbol["diagnostics"]:
            if diagnostic["severity"] == "error":
                findings.append(f"{symbol['name']}: {diagnostic['message']}")
    return 100.0 * float(types["completenessScore"]), findings


@nox.session
def typing(session: nox.Session) -> None:
    """Type-check with mypy --strict, then the public API's completeness with pyright.

    mypy checks the files listed in pyproject.toml (extra arguments replace them);
    ``pyright --verifytypes`` checks that every public name of the installed package has a
    known type, and fails below PYRIGHT_FLOOR percent. pyright's first run fetches its node
    package from the npm registry.
    """
    session.install(".[test]", "mypy", "pyright")
    session.run("mypy", *session.posargs)
    output = session.run(
        "pyright", "--verifytypes", "monte_trio", "--ignoreexternal", "--outputjson",
        silent=True, success_codes=[0, 1],
    )  # fmt: skip
    assert isinstance(output, str)
    score, findings = completeness(output)
    for finding in findings:
        session.log("pyright: %s", finding)
    session.log("pyright type completeness of the public API: %.1f%%", score)
    if score < PYRIGHT_FLOOR:
        session.error(
            f"pyright type completeness {score:.1f}% is below the floor of {PYRIGHT_FLOOR}% "
            "(PYRIGHT_FLOOR in noxfile.py): give the names listed above full type hints"
        )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML docs into docs/_build/html; every warning is an error."""
    session.install(".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def coverage(session: nox.Session) -> None:
    """Run the test suite once under coverage and fail below the floor in pyproject.toml.

    The report lists the lines and branches not covered; ``coverage html`` in the
    session's venv writes htmlcov/. Extra arguments go to pytest.
    """
    session.install("-e", ".[test]", "coverage")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "report")


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
