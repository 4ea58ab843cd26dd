"""Benchmark: how long the command line takes to answer ``--help``, each in a fresh process.

What an operator waits for when typing ``dsf-bridge ...``: interpreter start-up, the imports of
the command line, and the answer. Each command runs ``--runs`` times (after one warm-up run
that fills the file cache) as ``python -m dsf_bridge`` with this checkout first on the path,
which imports the same modules as the installed ``dsf-bridge`` script.

Run: ``python bench/cli.py [--runs N] [--imports]``. Prints the median wall-clock seconds per
command and last ``cli_help_seconds=<median of dsf-bridge --help>``; the target is below 0.5 s.
``--imports`` also prints the ten slowest imports of ``dsf-bridge --help`` (``-X importtime``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
COMMANDS = (
    ("--help",),
    ("run", "--help"),
    ("db", "upgrade", "--help"),
    ("instances", "list", "--help"),
    ("sandbox", "init", "--help"),
    ("version",),
)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    return env


def _once(args: tuple[str, ...], env: dict[str, str], failures: set[int]) -> float:
    start = time.perf_counter()
    result = subprocess.run(  # noqa: S603 - our own interpreter and package
        [sys.executable, "-m", "dsf_bridge", *args],
        env=env,
        cwd=CHECKOUT,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if result.returncode:
        failures.add(result.returncode)
    return time.perf_counter() - start


def _slowest_imports(env: dict[str, str], count: int = 10) -> list[tuple[int, str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dsf_bridge", "--help"],
        env=env,
        cwd=CHECKOUT,
        check=True,
        capture_output=True,
        text=True,
    )
    found: list[tuple[int, str]] = []
    for line in result.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            found.append((int(parts[1]), parts[2].strip()))
    return sorted(found, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (median)")
    parser.add_argument("--imports", action="store_true", help="show the slowest imports")
    options = parser.parse_args()
    env = _environment()
    medians: dict[tuple[str, ...], float] = {}
    for args in COMMANDS:
        failures: set[int] = set()
        _once(args, env, failures)  # warm-up: the file cache, .pyc files
        medians[args] = statistics.median(_once(args, env, failures) for _ in range(options.runs))
        name = "root_help" if args == ("--help",) else "_".join(a.strip("-") for a in args)
        failed = f" (failed: exit {sorted(failures)})" if failures else ""
        print(f"cli_{name}_seconds={medians[args]:.3f}{failed}")
    if options.imports:
        for microseconds, module in _slowest_imports(env):
            print(f"import {module} {microseconds / 1e6:.3f} s (cumulative)")
    print(f"cli_help_seconds={medians[('--help',)]:.3f}")


if __name__ == "__main__":
    main()
