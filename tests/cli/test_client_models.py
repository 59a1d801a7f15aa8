"""`propeller-fl models ...` against a real model registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from server.stack import Stack
from server.tensors import sha256_of
from tests.cli.helpers import Cli, flags, table_rows


async def test_init_get_list(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    init = (await cli("models", "init", "--dimension", "3", "--json", *f)).ok().json()
    assert init["version"] == 0 and init["model_uri"] == "fl/models/global_model_v0"
    assert [t["name"] for t in init["tensors"]] == ["w", "b"]
    assert init["tensors"][0]["dtype"] == "DTYPE_FLOAT64" and init["tensors"][0]["shape"] == [3]

    # Human output: the seed's model JSON plus version and sha256.
    got = (await cli("models", "get", "0", *f)).ok()
    lines = got.out.splitlines()
    assert json.loads(lines[-1]) == {"w": [0.0, 0.0, 0.0], "b": 0.0}
    assert re.search(r"^version:\s+0$", got.out, re.M)
    assert re.search(rf"^sha256:\s+{init['sha256']}$", got.out, re.M)

    by_uri = (await cli("models", "get", "fl/models/global_model_v0", "--json", *f)).ok().json()
    assert by_uri["model"] == {"w": [0.0, 0.0, 0.0], "b": 0.0}
    assert by_uri["sha256"] == init["sha256"] and by_uri["version"] == 0

    # float32 models keep their type: put one, then list shows both as a table.
    f32 = tmp_path / "m32.npz"
    np.savez(f32, w=np.array([1.5, -2.0], dtype=np.float32), b=np.float32(0.25))
    put = (await cli("models", "put", str(f32), "--json", *f)).ok().json()
    assert put["version"] == 1
    assert put["tensors"][0] == {"name": "w", "dtype": "DTYPE_FLOAT32", "shape": [2]}
    listed = (await cli("models", "list", *f)).ok()
    header, rows = table_rows(listed.out)
    assert header == ["VERSION", "URI", "SHA256", "TENSORS", "BYTES", "CREATED"]
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[0][1] == "fl/models/global_model_v0" and rows[0][3] == "w:float64[3] b:float64[]"
    assert rows[1][3] == "w:float32[2] b:float32[]" and rows[1][4] == "12"
    as_json = (await cli("models", "list", "--json", *f)).ok().json()
    assert [m["version"] for m in as_json["models"]] == [0, 1]
    latest = (await cli("models", "get", "latest", "--json", *f)).ok().json()
    assert latest["version"] == 1 and latest["model"] == {"w": [1.5, -2.0], "b": 0.25}


async def test_put_get_round_trip_json_and_npz(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    src = tmp_path / "model.json"
    model = {"w": [0.1, -0.2, 0.30000000000000004], "b": -1.25}
    src.write_text(json.dumps(model))
    put = (await cli("models", "put", str(src), "--version", "5", "--json", *f)).ok().json()
    assert put["version"] == 5 and put["model_uri"] == "fl/models/global_model_v5"
    expected = {"w": np.array(model["w"]), "b": np.array(model["b"])}
    assert put["sha256"] == sha256_of(expected)

    # To .json: exactly the seed's model JSON; to .npz: the arrays, bit for bit.
    out_json = tmp_path / "v5.json"
    wrote = (await cli("models", "get", "v5", "--output", str(out_json), *f)).ok()
    assert str(out_json) in wrote.out
    assert json.loads(out_json.read_text()) == model
    out_npz = tmp_path / "v5.npz"
    (await cli("models", "get", "5", "-o", str(out_npz), "--json", *f)).ok()
    with np.load(out_npz) as npz:
        assert list(npz.files) == ["w", "b"]
        np.testing.assert_array_equal(npz["w"], expected["w"])
        assert float(npz["b"]) == -1.25

    # The .npz goes back in as the next version with the same bytes (same sha256).
    again = (await cli("models", "put", str(out_npz), "--json", *f)).ok().json()
    assert again["version"] == 6 and again["sha256"] == put["sha256"]
    # What `models get --json` wrote is accepted by `models put` too.
    doc = tmp_path / "doc.json"
    doc.write_text((await cli("models", "get", "6", "--json", *f)).ok().out)
    third = (await cli("models", "put", str(doc), "--json", *f)).ok().json()
    assert third["version"] == 7 and third["sha256"] == put["sha256"]


async def test_models_errors(cli: Cli, stack: Stack, tmp_path: Path) -> None:
    f = flags(stack.endpoints)
    line = (await cli("models", "get", "9", *f)).failed_with("NOT_FOUND")
    assert line.startswith("propeller-fl models get: NOT_FOUND: ")
    f32 = await cli("models", "init", "--dimension", "2", "--dtype", "float32", "--json", *f)
    assert [t["dtype"] for t in f32.ok().json()["tensors"]] == ["DTYPE_FLOAT32"] * 2
    (await cli("models", "init", *f)).failed_with("propeller-fl models init: ALREADY_EXISTS")
    (await cli("models", "init", "--dimension", "0", *f)).failed_with("INVALID_ARGUMENT")
    (await cli("models", "get", "nope", *f)).failed_with("INVALID_ARGUMENT", "'nope'")

    bad = tmp_path / "bad.json"
    bad.write_text('{"w": [1, 2], "b": ')
    (await cli("models", "put", str(bad), *f)).failed_with("bad.json: not valid JSON")
    bad.write_text('{"w": [1, "x"], "b": 0}')
    (await cli("models", "put", str(bad), *f)).failed_with("tensor 'w'")
    bad.write_text('{"w": [1, NaN], "b": 0}')
    (await cli("models", "put", str(bad), *f)).failed_with("tensor 'w' contains NaN or Inf")
    txt = tmp_path / "model.txt"
    txt.write_text("1 2 3")
    (await cli("models", "put", str(txt), *f)).failed_with("unsupported model file type '.txt'")
    (await cli("models", "get", "0", "-o", str(txt), *f)).failed_with("use .json or .npz")
    (await cli("models", "put", str(tmp_path / "gone.json"), *f)).failed_with(
        "gone.json: no such file"
    )
    missing = tmp_path / "missing.npz"
    (await cli("models", "put", str(missing), *f)).failed_with("missing.npz: no such file")
