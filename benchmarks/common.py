"""What every benchmark shares: the results file, machine facts, child processes, medians."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results.jsonl"
# Set to a directory to sample every helper process with py-spy (see docs/benchmarks.md).
PROFILE_ENV = "BENCH_PYSPY_DIR"
# Or to a directory to run every helper process under cProfile.
CPROFILE_ENV = "BENCH_CPROFILE_DIR"

Json = dict[str, Any]


def git_commit() -> str:
    """HEAD's sha, with "-dirty" when the work tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return 0.0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine_info() -> Json:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "mem_gib": _mem_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "grpcio": _version("grpcio"),
        "wasmtime": _version("wasmtime"),
        "ziglang": _version("ziglang"),
    }


def peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM), KiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    """1000 -> 1e3, 2500000 -> 2.5e6, 30 -> 30."""
    if n < 1000:
        return f"{n:g}"
    mantissa, exp = f"{n:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


@dataclass
class Recorder:
    """Prints figures and appends them to the results file, one JSON object per case."""

    path: Path
    smoke: bool
    run_id: str = field(default_factory=lambda: f"{time.time():.0f}-{os.getpid()}")
    commit: str = field(default_factory=git_commit)
    machine: Json = field(default_factory=machine_info)
    lines: int = 0

    def record(
        self,
        benchmark: str,
        case: Json,
        figures: Json,
        *,
        targets: dict[str, bool] | None = None,
        summary: str = "",
    ) -> None:
        entry: Json = {
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "run": self.run_id,
            "commit": self.commit,
            "smoke": self.smoke,
            "benchmark": benchmark,
            "case": case,
            "figures": figures,
            "targets": targets or {},
            "summary": summary,
            "machine": self.machine,
        }
        verdict = ""
        if targets:
            verdict = (
                "  ["
                + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items())
                + "]"
            )
        print(f"{benchmark:<12} {summary}{verdict}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        self.lines += 1


class ChildFailed(RuntimeError):
    pass


class Child:
    """A helper process (`python -m benchmarks.child KIND ARGS`): its first stdout line is a
    JSON object saying it is ready (addresses and such); closing its stdin asks it to stop,
    after which it prints a last JSON line (its peak RSS) and exits."""

    def __init__(
        self, kind: str, args: Json, *, log_path: Path, ready_timeout_s: float = 120
    ) -> None:
        self.kind = kind
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "benchmarks.child", kind, json.dumps(args)]
        profile_dir = os.environ.get(PROFILE_ENV, "")
        if profile_dir:
            # Sample the child with py-spy: collapsed stacks of the threads holding the GIL.
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            out = Path(profile_dir) / f"{kind}-{time.time_ns()}.txt"
            spy = ["py-spy", "record", "--gil", "-r", "250", "--format", "raw", "-o", str(out)]
            command = [*spy, "--", *command]
        cprofile_dir = os.environ.get(CPROFILE_ENV, "")
        if cprofile_dir:  # deterministic profile of the child (pstats file)
            Path(cprofile_dir).mkdir(parents=True, exist_ok=True)
            out = Path(cprofile_dir) / f"{kind}-{time.time_ns()}.pstats"
            command = [sys.executable, "-m", "cProfile", "-o", str(out), *command[1:]]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        try:
            self.ready: Json = self._read_line(ready_timeout_s)
        except BaseException:
            self.kill()
            raise
        self.final: Json = {}

    def _read_line(self, timeout_s: float) -> Json:
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout_s
        while True:
            with selectors.DefaultSelector() as sel:
                sel.register(out, selectors.EVENT_READ)
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise ChildFailed(
                        f"{self.kind}: no answer within {timeout_s}s (see {self.log_path})"
                    )
            line = out.readline()
            if not line:
                self.proc.wait(10)
                raise ChildFailed(
                    f"{self.kind}: exited with {self.proc.returncode} (see {self.log_path})"
                )
            if line.startswith(b"{"):
                break  # anything else is a profiler's chatter
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    def stop(self, timeout_s: float = 60) -> Json:
        """Ask the child to stop; returns its last line (e.g. {"vmhwm_kib": ...})."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(ChildFailed, ValueError):
                self.final = self._read_line(timeout_s)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def children(*kids: Child) -> Iterator[tuple[Child, ...]]:
    try:
        yield kids
    finally:
        for kid in kids:
            kid.stop()


def write_line(stream: IO[str], value: Json) -> None:
    stream.write(json.dumps(value) + "\n")
    stream.flush()
