"""`propeller-fl datasets ...` against a real data store: CSV and .npy in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.cli.files import FileProblem, read_dataset_file
from server.stack import Stack
from tests.cli.conftest import SEEDED
from tests.cli.helpers import Cli, flags, table_rows


async def test_list_and_get_seeded(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    header, rows = table_rows((await cli("datasets", "list", *f)).ok().out)
    assert header == ["PROPLET", "SCHEMA", "SIZE", "FEATURES"]
    assert sorted(rows) == sorted([[p, "fl-demo-dataset-v1", "64", "3"] for p in SEEDED])

    got = (await cli("datasets", "get", SEEDED[0], "--json", *f)).ok().json()
    assert got["proplet_id"] == SEEDED[0] and got["size"] == 64 and got["num_features"] == 3
    assert np.asarray(got["features"]).shape == (64, 3)
    assert set(got["labels"]) <= {0.0, 1.0}

    text = (await cli("datasets", "get", SEEDED[0], *f)).ok().out
    head, _, body = text.partition("\n\n")
    assert "size:      64" in head
    cols, data = table_rows(body)
    assert cols == ["x0", "x1", "x2", "LABEL"] and len(data) == 64
    assert [int(r[3]) for r in data] == [int(v) for v in got["labels"]]


async def test_put_csv_and_npy_then_get_back_equal(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    rng = np.random.default_rng(7)
    features = rng.normal(size=(20, 4))
    labels = (rng.random(20) < 0.5).astype(np.float64)

    # CSV with a header line.
    with_header = tmp_path / "with_header.csv"
    lines = ["a,b,c,d,label"] + [
        ",".join([*(repr(float(v)) for v in row), str(int(y))])
        for row, y in zip(features, labels, strict=True)
    ]
    with_header.write_text("\n".join(lines) + "\n")
    info = (await cli("datasets", "put", "p-csv", str(with_header), "--json", *f)).ok().json()
    assert info == {
        "proplet_id": "p-csv",
        "schema": "fl-demo-dataset-v1",
        "size": 20,
        "num_features": 4,
        "num_classes": 2,
    }
    out_csv = tmp_path / "back.csv"
    (await cli("datasets", "get", "p-csv", "--output", str(out_csv), *f)).ok()
    back_x, back_y = read_dataset_file(out_csv)
    np.testing.assert_array_equal(back_x, features)
    np.testing.assert_array_equal(back_y, labels)
    assert out_csv.read_text().splitlines()[0] == "x0,x1,x2,x3,label"

    # CSV without a header (the written file, minus its header) stores the same data.
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("\n".join(out_csv.read_text().splitlines()[1:]) + "\n")
    human = (await cli("datasets", "put", "p-csv2", str(no_header), *f)).ok().out
    assert "size:      20" in human and "features:  4" in human

    # .npy in, .npy out.
    npy = tmp_path / "data.npy"
    np.save(npy, np.column_stack([features, labels]))
    (await cli("datasets", "put", "p-npy", str(npy), *f)).ok()
    out_npy = tmp_path / "back.npy"
    (await cli("datasets", "get", "p-npy", "-o", str(out_npy), "--json", *f)).ok()
    np.testing.assert_array_equal(np.load(out_npy), np.column_stack([features, labels]))

    got = (await cli("datasets", "get", "p-csv2", "--json", *f)).ok().json()
    np.testing.assert_array_equal(np.asarray(got["features"]), features)
    np.testing.assert_array_equal(np.asarray(got["labels"]), labels)
    listed = (await cli("datasets", "list", "--json", *f)).ok().json()
    assert {d["proplet_id"] for d in listed["datasets"]} == {*SEEDED, "p-csv", "p-csv2", "p-npy"}


BAD_CSV = [
    ("1,2,0\n3,x,1\n", "line 2, column 2: 'x' is not a number"),
    ("1,2,0\n3,4\n", "line 2: 2 columns, expected 3 as on line 1"),
    ("f1,f2,label\n1,2,0\n3,4,2\n", "line 3: label 2 must be 0 or 1"),
    ("1,inf,1\n", "'inf' is not a finite number"),
    ("x,y\n", "no data rows"),
    ("", "no data rows"),
    ("0\n1\n", "needs at least 2 columns"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_CSV)
def test_bad_csv_names_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(FileProblem) as err:
        read_dataset_file(path)
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


def test_bad_npy_names_the_problem(tmp_path: Path) -> None:
    cases = {
        "one_d.npy": (np.zeros(4), "expected a 2-D array"),
        "one_col.npy": (np.zeros((4, 1)), "needs at least 2 columns"),
        "labels.npy": (np.array([[1.0, 0.0], [2.0, 0.5]]), "row 1: label 0.5 must be 0 or 1"),
        "nan.npy": (np.array([[np.nan, 0.0]]), "row 0, column 0"),
        "text.npy": (np.array([["a", "b"]]), "is not numeric"),
    }
    for name, (arr, problem) in cases.items():
        path = tmp_path / name
        np.save(path, arr)
        with pytest.raises(FileProblem, match=problem):
            read_dataset_file(path)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(FileProblem, match=r"not a readable \.npy array"):
        read_dataset_file(garbage)


async def test_datasets_errors(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    line = (await cli("datasets", "get", "nobody", *f)).failed_with("NOT_FOUND", "nobody")
    assert line.startswith("propeller-fl datasets get: NOT_FOUND: ")
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0\n3,4,7\n")
    line = (await cli("datasets", "put", "p", str(bad), *f)).failed_with()
    assert line == (
        f"propeller-fl datasets put: {bad}: line 2: label 7 must be 0 or 1 "
        "(the last column is the label)"
    )
    (await cli("datasets", "put", "p", str(tmp_path / "none.csv"), *f)).failed_with(
        "none.csv: no such file"
    )
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_bytes(b"PK")
    (await cli("datasets", "put", "p", str(xlsx), *f)).failed_with("use .csv or .npy")
    (await cli("datasets", "get", SEEDED[0], "-o", str(xlsx), *f)).failed_with("use .csv or .npy")
    # Nothing was stored by the failed attempts.
    listed = (await cli("datasets", "list", "--json", *f)).ok().json()
    assert {d["proplet_id"] for d in listed["datasets"]} == set(SEEDED)
