"""`python -m benchmarks [--smoke] [--only NAME[,NAME]] [--results PATH]`

Runs the benchmarks in order, each printing its figures and appending them as JSON lines to
the results file (default `benchmarks/results.jsonl`). `--smoke` uses tiny sizes (what CI
runs). `--table` prints the latest full run of the results file as Markdown instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from benchmarks import (
    BENCHMARK_NAMES,
    aggregation,
    audit,
    bigmodel,
    fleet,
    ingest,
    quality,
    rounds,
    transfer,
    wasm,
)
from benchmarks.common import DEFAULT_RESULTS, Recorder
from benchmarks.report import markdown

Runner = Callable[[Recorder, bool], Coroutine[Any, Any, None]]

BENCHMARKS: dict[str, Runner] = {
    wasm.NAME: wasm.run,
    aggregation.NAME: aggregation.run,
    ingest.NAME: ingest.run,
    transfer.NAME: transfer.run,
    rounds.NAME: rounds.run,
    bigmodel.NAME: bigmodel.run,
    quality.NAME: quality.run,
    fleet.NAME: fleet.run,
    audit.NAME: audit.run,
}


assert tuple(BENCHMARKS) == BENCHMARK_NAMES


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code runs")
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}",
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON lines to append")
    p.add_argument("--table", action="store_true", help="print the latest run as Markdown")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.table:
        print(markdown(args.results))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    rec = Recorder(args.results, smoke=args.smoke)
    print(
        f"benchmarks: {', '.join(names)}{' (smoke)' if args.smoke else ''}; commit {rec.commit}; "
        f"{rec.machine['cpu']}, {rec.machine['cores']} cores; results -> {args.results}",
        flush=True,
    )
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        asyncio.run(BENCHMARKS[name](rec, args.smoke))
        print(f"{name:<12} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(
        f"benchmarks: {rec.lines} result lines in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
