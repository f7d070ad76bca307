"""Development sessions: ``nox`` runs the matrix; ``nox -s NAME`` runs one session.

``tests`` runs on every Python from 3.10 to 3.13 that nox finds on ``PATH`` (as
``python3.X``) and skips, with a message, the ones it does not find; ``nox -P 3.12 -s tests``
runs one of them. ``lowest`` runs on the lowest of those Pythons; the other sessions run on
the interpreter nox itself runs on. Sessions install with pip; venvs are reused between runs.
The Python versions are never downloaded: install them (pyenv, the OS) and put them on PATH.
"""

from __future__ import annotations

import ast
import copy
import json
import re
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
# every exported name has a known type (63 of 63), so any regression fails.
PYRIGHT_FLOOR = 100.0


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
    # One process: coverage follows no xdist worker.
    session.run("coverage", "run", "-m", "pytest", "-n", "0", *session.posargs)
    session.run("coverage", "report")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark suite and write docs/benchmarks.rst, its plot and JSON.

    `nox -s bench -- --quick` for a smoke run (its page then shows that run).
    """
    session.install(".[bench,compression]")
    session.run(
        "python", "-m", "benchmarks",
        "--json", "docs/_static/benchmarks.json",
        "--plot", "docs/_static/benchmarks.png",
        "--rst", "docs/benchmarks.rst",
        *session.posargs,
    )  # fmt: skip
    # The page is rewritten whole above: the codec table goes back at its end.
    session.run("python", "-m", "benchmarks.compression", "--rst", "docs/benchmarks.rst")


@nox.session
def fuzz(session: nox.Session) -> None:
    """Run the mutation fuzzer over every decoder: `nox -s fuzz -- --seconds 600`."""
    session.install(".[test]")
    session.run("python", "tests/fuzz_target.py", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Run the soak tests (marked soak) at full size: 200 connections, 20,000 requests, and
    1,000 seeded stream schedules (tests/test_stream_schedules.py)."""
    session.install(".[test]")
    session.run(
        "pytest",
        "-m",
        "soak",
        "-s",
        *session.posargs,
        env={
            "MONTE_SOAK_CONNECTIONS": "200",
            "MONTE_SOAK_REQUESTS": "20000",
            "MONTE_SCHEDULE_SEEDS": "1000",
        },
    )


# -- mutation testing ----------------------------------------------------------------------

# Each mutated module and the fast sans-IO tests that judge its mutants (no sockets, no
# threads but the trust module's, nothing that sleeps). The hello/verdict messages are last.
MUTATION_TARGETS: dict[str, list[str]] = {
    "monte_trio/_proto/_records.py": ["tests/test_records.py", "tests/test_edges_records.py"],
    "monte_trio/_trust.py": ["tests/test_trust.py", "tests/test_edges_trust.py"],
    "monte_trio/_known_keys.py": ["tests/test_trust.py", "tests/test_edges_trust.py"],
    "monte_trio/_dispatcher.py": ["tests/test_dispatcher.py"],
    "monte_trio/_proto/_frames.py": ["tests/test_monte_v1.py", "tests/test_edges_wire.py"],
    "monte_trio/_proto/_wire2.py": [
        "tests/test_native_v2_vectors.py",
        "tests/test_edges_wire.py",
        "tests/test_compression.py",
    ],
    "monte_trio/_proto/_compression.py": ["tests/test_compression.py"],
    "monte_trio/_proto/_native_hello.py": [
        "tests/test_native_vectors.py",
        "tests/test_edges_wire.py",
    ],
}
MUTMUT = "mutmut==3.8.1"

# Calls whose positional arguments are message text: an exception raised or built (its
# message), or a log line. A mutant that changes only these arguments changes what a
# message says, not what the code does; it is counted apart ("text-only").
_MESSAGE_CALL = re.compile(r"(Error|Exception|Rejected|Exceeded|Closed|Warning)$")
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def _drop_message_text(tree: ast.AST) -> str:
    """``ast.dump`` of ``tree`` with the positional arguments of message calls removed."""

    class Strip(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            is_log = (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "logger"
                and name in _LOG_METHODS
            )
            if _MESSAGE_CALL.search(name) or is_log:
                node.args = []
            self.generic_visit(node)
            return node

    return ast.dump(Strip().visit(tree))


def mutation_report(mutants: Path, module: str) -> dict[str, list[str]]:
    """Sort the mutants of ``module`` (a path such as ``monte_trio/_trust.py``) that
    ``mutmut run`` judged under ``mutants/``: ``killed`` (a test failed or timed out),
    ``survived`` (also when no selected test reaches it), ``text`` (survived, but changes
    only message text) and ``other`` (mutmut could not judge it).
    """
    meta = json.loads((mutants / (module + ".meta")).read_text())
    functions = {
        node.name: node
        for node in ast.walk(ast.parse((mutants / module).read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    report: dict[str, list[str]] = {"killed": [], "survived": [], "text": [], "other": []}
    for name, code in sorted(meta["exit_code_by_key"].items()):
        local = name.rpartition(".")[2]
        if code in (1, 3, 24, -24, 36, 152, 255):
            report["killed"].append(name)
        elif code not in (0, 5, 33):  # 5 and 33: no test reached it, as good as survived
            report["other"].append(name)
        else:
            original = functions[local.rpartition("__mutmut_")[0] + "__mutmut_orig"]
            mutant = copy.deepcopy(functions[local])
            mutant.name = original.name
            same = _drop_message_text(copy.deepcopy(original)) == _drop_message_text(mutant)
            report["text" if same else "survived"].append(name)
    return report


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the sans-IO core and the trust module; not part of CI.

    mutmut 3 (pinned: MUTMUT) rather than 2: it forks each mutant from a process that has
    already imported the tests and runs only the tests that reach the mutated function, so a
    mutant costs a fraction of a second instead of a fresh pytest start. It keeps its
    settings in pyproject.toml ``[tool.mutmut]``; this session adds, for each module of
    MUTATION_TARGETS in turn, ``only_mutate`` and the test selection (its fast sans-IO
    tests), and runs it in a copy of the tree under the session's tmp directory (so no
    ``mutants/`` directory appears in the work tree), with one worker.

    It prints each module's score on behaviour: killed / (killed + survived), where a
    survivor that changes only message text (an exception's or a log line's arguments) is
    left out and counted apart. The whole run (1,050 mutants) takes about 5 minutes on a
    2-core machine with Python 3.11. ``nox -s mutation -- _trust`` runs the modules whose
    path contains ``_trust``;
    ``mutmut results`` / ``mutmut show NAME`` in ``.nox/mutation/tmp/<module>`` then show
    the survivors.
    """
    session.install(".[test]", MUTMUT)
    pyproject = nox.project.load_toml("pyproject.toml")
    tool = pyproject["tool"]
    assert isinstance(tool, dict)
    wanted = session.posargs or [""]
    scores = []
    for module, tests in MUTATION_TARGETS.items():
        if not any(w in module for w in wanted):
            continue
        work = Path(session.create_tmp()) / Path(module).stem.lstrip("_")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for tree in ("monte_trio", "tests"):
            shutil.copytree(ROOT / tree, work / tree, ignore=shutil.ignore_patterns("__pycache__"))
        settings = dict(tool["mutmut"])
        settings["only_mutate"] = [module]
        settings["pytest_add_cli_args_test_selection"] = [t for t in tests if (ROOT / t).exists()]
        tables = {
            "tool.pytest.ini_options": tool["pytest"]["ini_options"],
            "tool.mutmut": settings,
        }
        lines = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            # JSON's strings, numbers, booleans and arrays are valid TOML values.
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
        with session.chdir(work):
            session.run("mutmut", "run", "--max-children", "1", silent=True)
        report = mutation_report(work / "mutants", module)
        killed, survived, text = (len(report[k]) for k in ("killed", "survived", "text"))
        total = sum(len(names) for names in report.values())
        score = 100.0 * killed / max(1, killed + survived)
        scores.append(
            f"{module}: {total} mutants, {killed} killed, {survived} survived, {text} "
            f"text-only, {len(report['other'])} not judged; {score:.1f}% on behaviour "
            f"({100.0 * killed / max(1, killed + survived + text):.1f}% counting text)"
        )
        for name in report["survived"]:
            session.log("survived: %s", name)
    for line in scores:
        session.log("%s", line)
