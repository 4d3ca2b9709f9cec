"""Every boundary check accepts what it should, normalises it, and names argument and value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazydp import _validate as v
from lazydp.errors import ConfigError

NOT_NUMBERS = [True, False, "1.0", None, [1.0], float("nan")]


def _rejects(fn, value, *names: str) -> None:
    with pytest.raises(ConfigError) as info:
        fn(value)
    message = str(info.value)
    for name in names:
        assert name in message
    # The message shows the bad value (NaN is spelled out).
    assert repr(value) in message or "NaN" in message


@pytest.mark.parametrize("value", NOT_NUMBERS + [-0.1, math.inf, -math.inf])
def test_noise_multiplier_rejects(value):
    _rejects(v.check_noise_multiplier, value, "noise_multiplier")


def test_noise_multiplier_accepts_and_normalises():
    assert v.check_noise_multiplier(0) == 0.0
    out = v.check_noise_multiplier(np.float32(1.5))
    assert out == 1.5 and type(out) is float
    assert v.check_noise_multiplier(3) == 3.0


@pytest.mark.parametrize("value", NOT_NUMBERS + [0.0, -1.0, math.inf, -math.inf])
def test_max_grad_norm_rejects(value):
    _rejects(v.check_max_grad_norm, value, "max_grad_norm")


def test_max_grad_norm_inf_only_with_flag():
    assert v.check_max_grad_norm(0.5) == 0.5
    assert v.check_max_grad_norm(math.inf, allow_inf=True) == math.inf
    with pytest.raises(ConfigError, match="max_grad_norm"):
        v.check_max_grad_norm(math.inf)
    # The flag admits +inf only, never nonsense.
    with pytest.raises(ConfigError):
        v.check_max_grad_norm(-math.inf, allow_inf=True)
    with pytest.raises(ConfigError):
        v.check_max_grad_norm(float("nan"), allow_inf=True)


@pytest.mark.parametrize("value", NOT_NUMBERS + [0.0, -0.5, 1.0000001, math.inf])
def test_sample_rate_rejects(value):
    _rejects(v.check_sample_rate, value, "sample_rate")


def test_sample_rate_accepts_bounds():
    assert v.check_sample_rate(1) == 1.0
    assert v.check_sample_rate(1e-9) == 1e-9


@pytest.mark.parametrize("value", NOT_NUMBERS + [0.0, 1.0, -1e-5, 2.0])
def test_delta_rejects(value):
    _rejects(v.check_delta, value, "delta")


def test_delta_accepts():
    assert v.check_delta(1e-5) == 1e-5
    assert v.check_delta(np.float64(0.5)) == 0.5


@pytest.mark.parametrize("value", NOT_NUMBERS + [0.0, -1.0, math.inf])
def test_epsilon_rejects(value):
    _rejects(v.check_epsilon, value, "epsilon")


def test_epsilon_custom_name_in_message():
    assert v.check_epsilon(8) == 8.0
    with pytest.raises(ConfigError, match="target_epsilon"):
        v.check_epsilon(-1, "target_epsilon")


@pytest.mark.parametrize("value", [0, -3, 1.0, 2.5, True, "3", None, np.float64(2.0)])
def test_positive_int_rejects(value):
    _rejects(lambda x: v.check_positive_int("steps", x), value, "steps")


def test_positive_int_accepts_numpy_ints():
    out = v.check_positive_int("steps", np.int64(7))
    assert out == 7 and type(out) is int


@pytest.mark.parametrize("value", ["", "SGD", "dp-sgd", None, 1, "lazy"])
def test_mode_rejects(value):
    with pytest.raises(ConfigError) as info:
        v.check_mode(value)
    message = str(info.value)
    assert "mode" in message and repr(value) in message
    assert all(m in message for m in v.MODES)  # lists what would have been accepted


@pytest.mark.parametrize("mode", ["sgd", "dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
def test_mode_accepts_the_five_modes(mode):
    assert v.check_mode(mode) == mode


def test_choice():
    assert v.check_choice("accountant", "rdp", ("pld", "rdp")) == "rdp"
    with pytest.raises(ConfigError, match=r"accountant must be one of 'pld', 'rdp'; got 'gdp'"):
        v.check_choice("accountant", "gdp", ["pld", "rdp"])


def test_config_error_is_a_value_error():
    # Callers catching the builtin keep working.
    with pytest.raises(ValueError):
        v.check_delta(2)
