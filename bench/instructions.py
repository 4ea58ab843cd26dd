"""Benchmark: the engine lifecycle of ``bench/engine.py`` counted in machine instructions.

Wall and CPU time on a shared two-core machine vary by a third from one block to the next;
instructions executed do not. This runs each engine's lifecycle under valgrind's ``lackey``
tool twice, with and without ``N`` lifecycles, and divides the difference by ``N``: the
instructions one lifecycle costs, start-up and imports excluded. The ratio of the two is the
engine_vs_spiffworkflow of ``bench/engine.py`` without the noise (instructions are not time:
cache misses and branch mispredictions are not counted, so the time ratio differs somewhat).

Run: ``python bench/instructions.py`` (needs valgrind, ``apt-get install valgrind``, and the
``bench`` extra). Takes about two minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
_INSTRUCTIONS = re.compile(r"guest instrs:\s+([\d,]+)")


def _child(engine: str, count: int) -> None:
    """Run ``count`` lifecycles of ``engine`` (inside valgrind)."""
    sys.path.insert(0, str(BENCH_DIR.parent))
    sys.path.insert(0, str(BENCH_DIR))
    import engine as bench  # noqa: PLC0415 - the sibling benchmark, after the path set-up

    lifecycle, _ = bench._ours() if engine == "ours" else bench._spiff()
    for index in range(count):
        lifecycle(index)


def _instructions(engine: str, count: int) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    done = subprocess.run(  # noqa: S603 - our own interpreter and this file
        [
            valgrind,
            "--tool=lackey",
            "--basic-counts=yes",
            sys.executable,
            __file__,
            "--child",
            engine,
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = _INSTRUCTIONS.search(done.stderr)
    if found is None:
        raise SystemExit(f"valgrind reported no instruction count:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def _per_lifecycle(engine: str, count: int) -> int:
    return (_instructions(engine, count) - _instructions(engine, 0)) // count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=int, default=2000, help="lifecycles of our engine")
    parser.add_argument("--spiff", type=int, default=200, help="lifecycles of SpiffWorkflow")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    ours = _per_lifecycle("ours", args.ours)
    spiff = _per_lifecycle("spiff", args.spiff)
    print(f"engine_instructions_per_lifecycle={ours}")
    print(f"spiffworkflow_instructions_per_lifecycle={spiff}")
    print(f"engine_vs_spiffworkflow_instructions={spiff / ours:.1f}")


if __name__ == "__main__":
    main()
