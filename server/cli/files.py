"""The CLI's local files: models (.json / .npz), datasets (.csv / .npy) and WASM modules.
Every problem is a `FileProblem` whose message names the file and what is wrong with it.

Dataset files, one set of rules for `datasets put` and `demo --dataset`:
- one row per sample: the features, then the label (0 or 1) in the last column; at least one
  feature, at least one row; every value a finite number;
- `.csv` (or `.txt`): comma-separated, UTF-8 (a BOM is allowed); blank lines are skipped; the
  first non-blank line may be a header (any cell not a number makes it one); every row has as
  many columns as the first;
- `.npy`: one 2-D numeric (or bool) array [samples, features + 1], read without pickle.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from server.tensors import Array, Tensors, model_to_json

WASM_MAGIC = b"\0asm"


class FileProblem(ValueError):
    """A local input file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------- model files


def _as_float_array(value: object, what: str) -> Array:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise FileProblem(f"{what}: not a number or a (nested) list of numbers") from None
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise FileProblem(f"{what}: not a number or a rectangular (nested) list of numbers")
    return arr


def read_model_file(path: Path, dtype: str | None = None) -> Tensors:
    """A model from .json ({"w": [...], "b": x}, or {"model": {...}} as `models get --json`
    writes) or .npz (one array per tensor). dtype "float32"/"float64" converts; default: the
    .npz's own float type, float64 for JSON and integer arrays."""
    suffix = model_file_type(path)
    tensors: Tensors = {}
    if suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FileProblem(
                f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except UnicodeDecodeError:
            raise FileProblem(f"{path}: not a UTF-8 text file") from None
        except FileNotFoundError:
            raise FileProblem(f"{path}: no such file") from None
        if isinstance(value, dict) and isinstance(value.get("model"), dict):
            value = value["model"]
        if not isinstance(value, dict) or not value:
            raise FileProblem(
                f'{path}: expected a JSON object of tensors like {{"w": [0.0, 0.0], "b": 0.0}}'
            )
        for name, raw in value.items():
            arr = _as_float_array(raw, f"{path}: tensor {name!r}")
            tensors[str(name)] = arr.astype(np.float64)
    else:
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
                for name in names:
                    tensors[name] = _as_float_array(npz[name], f"{path}: array {name!r}")
        except (ValueError, OSError, EOFError) as exc:
            if isinstance(exc, FileProblem):
                raise
            if isinstance(exc, FileNotFoundError):
                raise FileProblem(f"{path}: no such file") from None
            raise FileProblem(f"{path}: not a readable .npz archive ({exc})") from None
        if not tensors:
            raise FileProblem(f"{path}: the archive holds no arrays")
    out: Tensors = {}
    for name, arr in tensors.items():
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
            arr = arr.astype(np.float64)
        # astype, not ascontiguousarray: that would turn a scalar into shape [1].
        arr = arr.astype(arr.dtype.newbyteorder("<"), order="C")
        if not np.isfinite(arr).all():
            raise FileProblem(f"{path}: tensor {name!r} contains NaN or Inf")
        out[name] = arr
    return out


def write_model_file(path: Path, tensors: Mapping[str, Array]) -> None:
    if model_file_type(path) == ".json":
        path.write_text(json.dumps(model_to_json(tensors)) + "\n", encoding="utf-8")
    else:
        with open(path, "wb") as f:
            np.savez(f, **dict(tensors))  # type: ignore[arg-type]  # name -> array


def model_file_type(path: Path) -> str:
    """The kind of model file: ".json" or ".npz"; FileProblem for any other."""
    return _file_type(path, "model", (".json", ".npz"))


def dataset_file_type(path: Path, *, reading: bool = False) -> str:
    """The kind of dataset file: ".csv" or ".npy" (a ".txt" is read as CSV, never written);
    FileProblem for any other."""
    suffix = _file_type(path, "dataset", (".csv", ".npy", ".txt") if reading else (".csv", ".npy"))
    return ".csv" if suffix == ".txt" else suffix


def _file_type(path: Path, what: str, suffixes: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        use = " or ".join(suffixes[:2])
        raise FileProblem(f"{path}: unsupported {what} file type {suffix!r} (use {use})")
    return suffix


# -------------------------------------------------------------------------- dataset files


def _parse_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_dataset_csv(path: Path) -> tuple[Array, Array]:
    """CSV rows `feature,...,feature,label`; an optional header line; label 0 or 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FileProblem(f"{path}: not a UTF-8 text (CSV) file") from None
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[float]]] = []
    width = 0
    first_line = 0
    header_seen = False
    try:
        for cells in reader:
            line = reader.line_num
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            values = [_parse_number(c) for c in cells]
            if not rows and not header_seen and any(v is None for v in values):
                header_seen = True  # a header: names, not numbers
                width, first_line = len(cells), line
                continue
            for j, (cell, v) in enumerate(zip(cells, values, strict=True)):
                if v is None:
                    raise FileProblem(
                        f"{path}: line {line}, column {j + 1}: {cell!r} is not a number"
                    )
                if not math.isfinite(v):
                    raise FileProblem(
                        f"{path}: line {line}, column {j + 1}: {cell!r} is not a finite number"
                    )
            if width == 0:
                width, first_line = len(cells), line
            if len(cells) != width:
                raise FileProblem(
                    f"{path}: line {line}: {len(cells)} columns, expected {width} "
                    f"as on line {first_line}"
                )
            rows.append((line, [v for v in values if v is not None]))
    except csv.Error as exc:
        raise FileProblem(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise FileProblem(f"{path}: no data rows (expected feature,...,label lines)")
    if width < 2:
        raise FileProblem(
            f"{path}: line {rows[0][0]}: needs at least 2 columns (features..., label), got 1"
        )
    data = np.asarray([v for _, v in rows], dtype=np.float64)
    return _features_and_labels(path, data, lambda i: f"line {rows[i][0]}")


def read_dataset_npy(path: Path) -> tuple[Array, Array]:
    """A 2-D .npy array [samples, features + 1]; the last column is the 0/1 label."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FileProblem(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise FileProblem(f"{path}: not a single .npy array")
    if arr.dtype.kind not in "iufb":
        raise FileProblem(f"{path}: array of {arr.dtype} is not numeric")
    if arr.ndim != 2:
        raise FileProblem(
            f"{path}: expected a 2-D array [samples, features + label], got shape {list(arr.shape)}"
        )
    if arr.shape[1] < 2:
        raise FileProblem(
            f"{path}: needs at least 2 columns (features..., label), got {arr.shape[1]}"
        )
    if arr.shape[0] < 1:
        raise FileProblem(f"{path}: no rows")
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        r, c = (int(x) for x in np.argwhere(~finite)[0])
        raise FileProblem(f"{path}: row {r}, column {c}: {data[r, c]!r} is not a finite number")
    return _features_and_labels(path, data, lambda i: f"row {i}")


def _features_and_labels(
    path: Path, data: Array, where: Callable[[int], str]
) -> tuple[Array, Array]:
    """Features [n, d] and labels [n] of a table whose last column is the label; `where(i)`
    names row i as the file's reader counts it ("line 7", "row 6")."""
    labels = np.ascontiguousarray(data[:, -1])
    bad = ~((labels == 0.0) | (labels == 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise FileProblem(
            f"{path}: {where(i)}: label {labels[i]:g} must be 0 or 1 (the last column is the label)"
        )
    return np.ascontiguousarray(data[:, :-1]), labels


def read_dataset_file(path: Path) -> tuple[Array, Array]:
    """Features [n, d] and 0/1 labels [n] from a .csv/.txt or .npy file (the module
    docstring has the rules)."""
    if not path.is_file():
        raise FileProblem(f"{path}: no such file")
    if dataset_file_type(path, reading=True) == ".npy":
        return read_dataset_npy(path)
    return read_dataset_csv(path)


def write_dataset_file(path: Path, features: Array, labels: Array) -> None:
    """.npy: [n, d + 1] float64, label last; .csv: a header `x0,...,label`, then the rows."""
    if dataset_file_type(path) == ".npy":
        with open(path, "wb") as f:
            np.save(f, np.column_stack([features.astype(np.float64), labels.astype(np.float64)]))
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([f"x{i}" for i in range(features.shape[1])] + ["label"])
            for row, label in zip(features.tolist(), labels.tolist(), strict=True):
                writer.writerow([repr(float(v)) for v in row] + [str(int(label))])


def read_wasm_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileProblem(f"{path}: is a directory, not a .wasm file") from None
    if not data.startswith(WASM_MAGIC):
        raise FileProblem(f"{path}: not a WebAssembly module (no \\0asm header)")
    return data
