"""shared.evaluate.options: the light set and the parsers of the command's text options."""

from __future__ import annotations

import pytest

from shared.evaluate.options import (
    EvaluateError,
    check_chip,
    light_options,
    parse_attacks,
    parse_budget,
    parse_eps,
    parse_l0_budgets,
    parse_time_steps,
)


def test_light_set_picks_the_attacks_that_apply():
    light = light_options("mnist-subset")
    assert light.attacks == ("pgd-pdsg", "pgd-atan", "fgsm-atan", "square")
    assert light.eps == () and light.budget is None and not light.checks  # the headline only
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


def test_budgets_parse_radii_and_shares():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget("0.25%") == pytest.approx(0.0025)
    assert parse_l0_budgets("0.1%, 1%") == pytest.approx((0.001, 0.01))
    for bad in ("150%", "x", "-0.1"):
        with pytest.raises(EvaluateError):
            parse_budget(bad)


def test_full_set_covers_every_estimator():
    from shared.attack import ESTIMATORS
    from shared.evaluate.options import DEFAULT_ATTACKS

    assert {f"pgd-{e}" for e in ESTIMATORS} <= set(DEFAULT_ATTACKS)
    assert {"fgsm-pdsg", "square", "sda"} <= set(DEFAULT_ATTACKS)


def test_chip_preset_must_exist():
    assert check_chip("edge-int8") == "edge-int8"
    with pytest.raises(EvaluateError, match="unknown chip preset"):
        check_chip("gpu9000")
