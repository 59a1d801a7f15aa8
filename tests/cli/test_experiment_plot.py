"""`experiment plot`: which points it draws, and that it writes a PNG of them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from server.cli.report import experiment_series, write_experiment_plot

pytestmark = pytest.mark.unit

ROUNDS = [
    (1, {"loss": 0.7, "accuracy": 0.5}, {}),
    (2, {"loss": 0.5, "accuracy": 0.6}, {"loss": 0.55, "accuracy": 0.58}),
    (3, {"loss": 0.4}, {"accuracy": 0.7}),
]


def test_series_take_the_rounds_that_have_each_metric() -> None:
    assert experiment_series(ROUNDS) == {
        ("loss", "train (updates)"): [(1, 0.7), (2, 0.5), (3, 0.4)],
        ("loss", "evaluation (held-out)"): [(2, 0.55)],
        ("accuracy", "train (updates)"): [(1, 0.5), (2, 0.6)],
        ("accuracy", "evaluation (held-out)"): [(2, 0.58), (3, 0.7)],
    }
    assert experiment_series([(1, {}, {})]) == {}


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "exp.png"
    write_experiment_plot(out, ROUNDS, "experiment e")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (990, 418)  # 9 x 3.8 inches at 110 dpi
    assert [p.name for p in out.parent.iterdir()] == ["exp.png"]  # no temporary left
