"""`setting` fields: one declaration gives a config field its default and its variable, and
`settings_from_env` reads them all by the type each field declares."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.config import setting, settings_from_env


@dataclass(frozen=True)
class Example:
    name: str = setting("EXAMPLE_NAME", "default")
    count: int = setting("EXAMPLE_COUNT", 3)
    # A float field with an integer default still reads "2.5".
    ratio: float = setting("EXAMPLE_RATIO", 1)
    other: str = "not from the environment"


def test_unset_and_empty_variables_keep_the_defaults() -> None:
    assert settings_from_env(Example, {}) == {"name": "default", "count": 3, "ratio": 1}
    assert settings_from_env(Example, {"EXAMPLE_NAME": "", "EXAMPLE_COUNT": ""}) == {
        "name": "default",
        "count": 3,
        "ratio": 1,
    }


def test_each_variable_is_read_as_its_fields_type() -> None:
    env = {"EXAMPLE_NAME": "n", "EXAMPLE_COUNT": "7", "EXAMPLE_RATIO": "2.5", "OTHER": "x"}
    assert Example(**settings_from_env(Example, env)) == Example("n", 7, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXAMPLE_COUNT": "2.5"}, "EXAMPLE_COUNT: '2.5' is not an integer"),
        ({"EXAMPLE_RATIO": "fast"}, "EXAMPLE_RATIO: 'fast' is not a number"),
    ],
)
def test_a_malformed_number_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        settings_from_env(Example, env)
    assert str(caught.value) == message
