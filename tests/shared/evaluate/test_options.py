"""shared.evaluate.options: the light set and the parsers of the command's text options."""

from __future__ import annotations

import pytest

from shared.evaluate.options import (
    EvaluateError,
    check_chip,
    light_options,
    parse_attacks,
    parse_eps,
    parse_time_steps,
)


def test_light_set_picks_the_attacks_that_apply():
    assert light_options("mnist-subset").attacks == ("pgd-pdsg", "pgd-atan")
    assert light_options("dvs-digits", seed=3).attacks == ("sda",)
    assert light_options("digits", seed=3).seed == 3


@pytest.mark.parametrize(("text", "expected"), [("8/255,16/255", (8 / 255, 16 / 255)),
                                                ("0.1", (0.1,)), ("0", (0.0,))])
def test_eps_parses_fractions(text, expected):
    assert parse_eps(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["-1/255", "2", "abc", "1/0", ""])
def test_bad_eps_is_refused(text):
    with pytest.raises(EvaluateError):
        parse_eps(text)


@pytest.mark.parametrize("text", ["0", "1,x", "", "-2"])
def test_bad_time_steps_are_refused(text):
    with pytest.raises(EvaluateError):
        parse_time_steps(text)


def test_time_steps_and_attacks_drop_duplicates_in_order():
    assert parse_time_steps("4, 1,4,2") == (4, 1, 2)
    assert parse_attacks("sda,pgd-pdsg, sda,fgsm-atan") == ("sda", "pgd-pdsg", "fgsm-atan")


@pytest.mark.parametrize("text", ["pgd-magic", "cw-pdsg", "pgd"])
def test_unknown_attack_is_refused(text):
    with pytest.raises(EvaluateError, match="unknown attack"):
        parse_attacks(text)


def test_chip_preset_must_exist():
    assert check_chip("edge-int8") == "edge-int8"
    with pytest.raises(EvaluateError, match="unknown chip preset"):
        check_chip("gpu9000")
