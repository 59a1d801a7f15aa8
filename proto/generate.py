"""Regenerate the committed Python code from proto/propeller/v1/*.proto.

python proto/generate.py          # write generated files next to the .proto files
python proto/generate.py --check  # regenerate into a temp dir; exit 1 on any drift
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = PROTO_ROOT / "propeller" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    protos = sorted(PACKAGE.glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *[str(p) for p in protos],
        ],
        check=True,
    )
    return [out / "propeller" / "v1" / (p.stem + s) for p in protos for s in SUFFIXES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on drift, change nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        drift = []
        for path in fresh:
            committed = PACKAGE / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                drift.append(committed.name)
            elif not args.check:
                continue
            if not args.check:
                shutil.copyfile(path, committed)
        generated_names = {p.name for p in fresh}
        stale = [
            p.name
            for p in PACKAGE.iterdir()
            if p.name.endswith(SUFFIXES) and p.name not in generated_names
        ]
    if args.check:
        if drift or stale:
            print(f"generated code drifted from the .proto files: {sorted(drift + stale)}")
            print("run: python proto/generate.py")
            return 1
        print(f"generated code matches the .proto files ({len(fresh)} files)")
        return 0
    for name in stale:
        (PACKAGE / name).unlink()
    print(f"regenerated {len(drift)} file(s), removed {len(stale)} stale")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
