"""A coverage-guided mutation fuzzer over the property tests of ``tests/test_fuzz.py``.

Usage::

    python tests/fuzz_target.py --seconds 60 [--seed N] [--target NAME ...] [--list]
    python tests/fuzz_target.py --reproduce TARGET HEX

The targets ARE the Hypothesis property tests of ``tests/test_fuzz.py`` (every ``test_*``
there that is decorated with ``@given``): their strategies build the inputs and their
assertions are the invariants, so there is one copy of each decoder's input generation
and of its checks. A test's ``hypothesis.fuzz_one_input(buffer)`` turns a byte buffer into
the strategies' choices, runs the test once, and raises if it fails (Hypothesis'
documented hook for external fuzzers). What lives here is only what a fuzzer adds: byte
mutations of those buffers, a corpus kept by coverage feedback (a buffer is kept when it
runs a line of ``monte_trio`` that no earlier input ran), a time budget, and a report.

Every run of a target is deterministic in its buffer, so the hex printed on a failure
reproduces it with ``--reproduce TARGET HEX``. Exit status: 0 if every input passed, 1 on
the first failure (after printing the target, the traceback and the buffer in hex), 2 on
bad arguments.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import attrs

import monte_trio

if __name__ == "__main__":  # run as a script: tests/ is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_fuzz

__all__ = ["TARGETS", "FuzzFailure", "Report", "Target", "main", "mutate", "run"]

FuzzFunction = Callable[[bytes], "bytes | None"]
"""Runs one input; returns the buffer it consumed, None if it was not a valid input (too
short for the strategies, or refused by ``assume``), or raises if the property failed."""

SEED_SIZES = (64, 512, 4096)
"""Sizes of the random buffers each target starts from (Hypothesis reads them as choices)."""
MAX_INPUT = 16_384


@attrs.frozen
class Target:
    name: str
    function: FuzzFunction


def _targets() -> dict[str, Target]:
    found = {}
    for name, test in sorted(vars(test_fuzz).items()):
        handle = getattr(test, "hypothesis", None)
        if name.startswith("test_") and handle is not None:
            found[name] = Target(name, handle.fuzz_one_input)
    return found


TARGETS: dict[str, Target] = _targets()
"""The property tests of tests/test_fuzz.py, by name."""


# ---------------------------------------------------------------------------------------
# Mutation and feedback
# ---------------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes]) -> bytes:
    """A few random byte-level edits of ``data`` (a buffer of Hypothesis choices)."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(7)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an extreme byte
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:  # insert random bytes
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.choice((1, 2, 4, 16, 64)))
        elif op == 3 and n:  # delete a range
            at = rng.randrange(n)
            del buf[at : at + rng.choice((1, 2, 4, 16, 64))]
        elif op == 4 and n:  # duplicate a range
            at = rng.randrange(n)
            buf[at:at] = buf[at : at + rng.choice((1, 4, 16, 100))]
        elif op == 5 and corpus:  # splice with another input
            other = rng.choice(corpus)
            at = rng.randrange(n + 1)
            buf = buf[:at] + other[rng.randrange(len(other) + 1) :]
        elif op == 6 and n:  # overwrite a range with random bytes
            at = rng.randrange(n)
            size = rng.choice((1, 2, 4, 8, 32))
            buf[at : at + size] = rng.randbytes(size)
    return bytes(buf[:MAX_INPUT])


class LineFeedback:
    """Which lines of the monte_trio package each target's inputs ran (``sys.settrace``).

    :meth:`call` runs one input of a target and says how many lines it ran that no input
    of that target ran before.
    The tracer already installed (coverage.py's, under ``nox -s coverage``) is restored
    after each input.
    """

    def __init__(self) -> None:
        self.lines: dict[str, set[tuple[CodeType, int]]] = {}
        self._seen: set[tuple[CodeType, int]] = set()
        self._new = 0
        self._package = str(Path(monte_trio.__file__).resolve().parent)
        self._wanted: dict[str, bool] = {}

    def _trace_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        wanted = self._wanted.get(filename)
        if wanted is None:
            wanted = self._wanted[filename] = filename.startswith(self._package)
        return self._trace_line if wanted else None

    def _trace_line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            key = (frame.f_code, frame.f_lineno)
            if key not in self._seen:
                self._seen.add(key)
                self._new += 1
        return self._trace_line

    def call(self, target: Target, data: bytes) -> tuple[bytes | None, int]:
        previous = sys.gettrace()
        self._seen = self.lines.setdefault(target.name, set())
        self._new = 0
        sys.settrace(self._trace_call)
        try:
            result = target.function(data)
        finally:
            sys.settrace(previous)
        return result, self._new


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


@attrs.define
class FuzzFailure:
    target: str
    data: bytes
    error: BaseException

    def describe(self) -> str:
        tb = "".join(traceback.format_exception(self.error))
        return (
            f"FAILURE in target {self.target!r}: {type(self.error).__name__}: {self.error}\n"
            f"{tb}\ninput ({len(self.data)} bytes, hex):\n{self.data.hex()}\n"
            f"reproduce: python tests/fuzz_target.py --reproduce {self.target} <hex>"
        )


@attrs.define
class Report:
    executions: Counter[str] = attrs.field(factory=Counter)
    invalid: Counter[str] = attrs.field(factory=Counter)
    corpus_sizes: dict[str, int] = attrs.field(factory=dict)
    lines: int = 0
    failure: FuzzFailure | None = None
    elapsed: float = 0.0


def run(
    *,
    seconds: float | None = None,
    iterations: int | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    targets: Sequence[Target] | None = None,
    max_corpus: int = 200,
) -> Report:
    """Fuzz until ``seconds`` have passed or ``iterations`` inputs ran (whichever first).

    ``names`` picks targets of :data:`TARGETS` (default: all); ``targets`` gives them.
    """
    if seconds is None and iterations is None:
        raise ValueError("give seconds or iterations")
    rng = random.Random(seed)
    if targets is None:
        targets = [TARGETS[n] for n in (names or sorted(TARGETS))]
    report = Report()
    feedback = LineFeedback()
    corpora: dict[str, list[bytes]] = {t.name: [] for t in targets}
    started = time.monotonic()
    deadline = None if seconds is None else started + seconds

    def one(target: Target, data: bytes) -> bool:
        try:
            used, new_lines = feedback.call(target, data)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the property failed: report it
            report.failure = FuzzFailure(target.name, data, exc)
            return False
        report.executions[target.name] += 1
        corpus = corpora[target.name]
        if used is None:
            report.invalid[target.name] += 1
        elif (new_lines or not corpus) and len(corpus) < max_corpus:
            corpus.append(used)
        return True

    for target in targets:  # random seeds first, so every target has a corpus
        for size in SEED_SIZES:
            if not one(target, rng.randbytes(size)):
                return _finish(report, corpora, feedback, started)
    count = 0
    while (iterations is None or count < iterations) and not (
        deadline is not None and count % 16 == 0 and time.monotonic() >= deadline
    ):
        count += 1
        target = rng.choice(targets)
        corpus = corpora[target.name]
        if rng.random() < 0.05 or not corpus:
            data = rng.randbytes(rng.choice(SEED_SIZES))
        else:
            data = mutate(rng.choice(corpus), rng, corpus)
        if not one(target, data):
            break
    return _finish(report, corpora, feedback, started)


def _finish(
    report: Report, corpora: dict[str, list[bytes]], feedback: LineFeedback, started: float
) -> Report:
    report.corpus_sizes = {name: len(c) for name, c in corpora.items()}
    report.lines = len(set().union(*feedback.lines.values()))
    report.elapsed = time.monotonic() - started
    return report


def summary(report: Report) -> str:
    total = sum(report.executions.values())
    lines = [
        f"{total} executions in {report.elapsed:.1f} s "
        f"({total / max(report.elapsed, 1e-9):.0f}/s), {report.lines} lines of monte_trio run, "
        f"{'FAILED' if report.failure else 'every property held'}"
    ]
    for name in sorted(report.executions):
        lines.append(
            f"  {name:<72} {report.executions[name]:>7} runs, "
            f"{report.invalid[name]:>6} invalid, corpus {report.corpus_sizes.get(name, 0):>3}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "HEX"))
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.reproduce:
        name, hex_input = args.reproduce
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
        data = bytes.fromhex(hex_input)
        try:
            used = TARGETS[name].function(data)
        except BaseException as exc:
            print(FuzzFailure(name, data, exc).describe())
            return 1
        print(f"{name}: {'passed' if used is not None else 'not a valid input'}")
        return 0
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzzing {len(args.target or TARGETS)} targets for {args.seconds} s, seed {seed}")
    report = run(seconds=args.seconds, seed=seed, names=args.target)
    print(summary(report))
    if report.failure is not None:
        print(report.failure.describe())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
