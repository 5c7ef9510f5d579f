"""SolverSettings: defaults, validation messages, merging; the module does not import torch."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fpidsl.runtime.settings import (
    BACKWARD_DEFAULTS,
    FORWARD_DEFAULTS,
    SETTING_KEYS,
    SettingsError,
    SolverSettings,
)


def test_defaults_and_keys():
    assert SETTING_KEYS == ("method", "m", "beta", "lam", "tol", "criterion", "max_iter", "min_iter",
                            "check_every", "on_fail", "mode", "k", "tau")
    assert FORWARD_DEFAULTS == SolverSettings()
    assert (FORWARD_DEFAULTS.tol, BACKWARD_DEFAULTS.tol) == (1e-5, 1e-6)
    assert FORWARD_DEFAULTS.as_dict() == {
        "method": "picard", "m": None, "beta": 1.0, "lam": 1e-4, "tol": 1e-5, "criterion": "relative",
        "max_iter": 500, "min_iter": 0, "check_every": 1, "on_fail": "warn", "mode": "implicit", "k": None, "tau": 1.0,
    }
    assert FORWARD_DEFAULTS.merged({"method": "anderson"}).memory == 5  # each method's default memory
    assert FORWARD_DEFAULTS.merged({"method": "broyden"}).memory == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        FORWARD_DEFAULTS.tol = 1.0


def test_merged_overrides_and_keeps_the_rest():
    s = BACKWARD_DEFAULTS.merged({"method": "anderson", "m": 3, "beta": 0.5})
    assert (s.method, s.m, s.beta, s.tol) == ("anderson", 3, 0.5, 1e-6)
    assert FORWARD_DEFAULTS.merged({}) is FORWARD_DEFAULTS
    assert FORWARD_DEFAULTS.merged({"tol": 1}).tol == 1


BAD = [
    ({"tolerance": 1e-3}, "unknown solver setting 'tolerance'; known: method, m, beta, lam, tol, criterion, "
                          "max_iter, min_iter, check_every, on_fail, mode, k, tau"),
    ({"criterion": "rel"}, "criterion must be 'relative' or 'absolute', got 'rel'"),
    ({"method": "newton"}, "method must be one of 'picard', 'anderson', 'broyden', 'gmres', got 'newton'"),
    ({"method": "gmres"}, "method 'gmres' solves the linear system of the backward; it is a backward setting "
                          "(backward={'method': 'gmres'}), not a forward one"),
    ({"mode": "jfb"}, "mode is a backward setting (backward={'mode': 'jfb'}), not a forward one"),
    ({"m": 1000000000}, "m must be an integer with 1 <= m <= 1000, got 1000000000"),
    ({"tol": float("inf")}, "tol must be a finite number > 0, got inf"),
    ({"lam": float("inf")}, "lam must be a finite number >= 0, got inf"),
    ({"on_fail": "crash"}, "on_fail must be one of 'warn', 'raise', 'ignore', got 'crash'"),
    ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
    ({"max_iter": 10.0}, "max_iter must be an integer >= 1, got 10.0"),
    ({"max_iter": True}, "max_iter must be an integer >= 1, got True"),
    ({"min_iter": -1}, "min_iter must be an integer >= 0, got -1"),
    ({"m": 0}, "m must be an integer with 1 <= m <= 1000, got 0"),
    ({"tol": 0}, "tol must be a finite number > 0, got 0"),
    ({"tol": "1e-5"}, "tol must be a finite number > 0, got '1e-5'"),
    ({"tol": float("nan")}, "tol must be a finite number > 0, got nan"),
    ({"beta": 1.5}, "beta must be a finite number with 0 < beta <= 1, got 1.5"),
    ({"beta": 0}, "beta must be a finite number with 0 < beta <= 1, got 0"),
    ({"lam": -1e-3}, "lam must be a finite number >= 0, got -0.001"),
    ({"min_iter": 10, "max_iter": 5}, "min_iter must be <= max_iter, got min_iter=10 and max_iter=5"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_settings_name_the_key_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(SettingsError) as info:
        FORWARD_DEFAULTS.merged(overrides)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_settings_module_does_not_import_torch():
    path = Path(__file__).resolve().parents[2] / "fpidsl" / "runtime" / "settings.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fpidsl_settings', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['fpidsl_settings'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.FORWARD_DEFAULTS.tol == 1e-5\n"
        "assert 'torch' not in sys.modules, 'settings.py imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


BAD_BACKWARD = [
    ({"mode": "adjoint"}, "mode must be one of 'implicit', 'jfb', 'phantom', 'unrolled', got 'adjoint'"),
    ({"mode": "phantom", "k": 0}, "k must be an integer with 1 <= k <= 10000, got 0"),
    ({"mode": "phantom", "tau": 1.5}, "tau must be a finite number with 0 < tau <= 1, got 1.5"),
    ({"method": "gmres", "m": 1001}, "m must be an integer with 1 <= m <= 1000, got 1001"),
]


@pytest.mark.parametrize("overrides, message", BAD_BACKWARD, ids=[str(b[0]) for b in BAD_BACKWARD])
def test_bad_backward_settings(overrides, message):
    with pytest.raises(SettingsError) as info:
        BACKWARD_DEFAULTS.merged(overrides)
    assert str(info.value) == message


def test_typed_values_carry_the_keys_users_write():
    from fpidsl.runtime.settings import (AndersonMethod, BroydenMethod, GmresMethod, ImplicitGradient,
                                         JacobianFreeGradient, PhantomGradient, PicardMethod, UnrolledGradient)

    assert FORWARD_DEFAULTS.solver_method == PicardMethod(beta=1.0)
    assert FORWARD_DEFAULTS.merged({"beta": 0.5}).solver_method == PicardMethod(beta=0.5)
    assert FORWARD_DEFAULTS.merged({"method": "anderson", "m": 3}).solver_method == AndersonMethod(3, 1.0, 1e-4)
    assert FORWARD_DEFAULTS.merged({"method": "broyden", "m": 30}).solver_method == BroydenMethod(30)
    assert BACKWARD_DEFAULTS.merged({"method": "gmres"}).solver_method == GmresMethod(30)
    assert BACKWARD_DEFAULTS.gradient == ImplicitGradient()
    assert BACKWARD_DEFAULTS.merged({"mode": "jfb"}).gradient == JacobianFreeGradient()
    assert BACKWARD_DEFAULTS.merged({"mode": "phantom"}).gradient == PhantomGradient(5, 1.0)
    assert BACKWARD_DEFAULTS.merged({"mode": "phantom", "k": 3, "tau": 0.5}).gradient == PhantomGradient(3, 0.5)
    assert BACKWARD_DEFAULTS.merged({"mode": "unrolled", "k": 7}).gradient == UnrolledGradient(7)
    assert BACKWARD_DEFAULTS.merged({"mode": "jfb"}).role == "backward"  # the role survives merging


@pytest.mark.parametrize("base, overrides, message", [
    (FORWARD_DEFAULTS, {"m": 3}, "m applies to method = anderson, broyden or gmres, but the method is picard"),
    (FORWARD_DEFAULTS, {"method": "broyden", "beta": 0.5},
     "beta applies to method = picard or anderson, but the method is broyden"),
    (BACKWARD_DEFAULTS, {"k": 4}, "k applies to mode = phantom or unrolled, but the mode is implicit"),
    (BACKWARD_DEFAULTS, {"mode": "unrolled", "tau": 0.3}, "tau applies to mode = phantom, but the mode is unrolled"),
])
def test_an_option_the_method_or_mode_does_not_take_is_refused_as_in_a_spec(base, overrides, message):
    """The spec's block refuses these (fpidsl.passes.settings); the Python form kept and ignored them."""
    with pytest.raises(SettingsError, match=message):
        base.merged(overrides)
    assert base.merged({"method": "anderson", "m": 3}).memory == 3  # where the method takes it
    assert FORWARD_DEFAULTS.merged({"method": "anderson", "m": 3}).merged({"tol": 1e-3}).m == 3  # kept, not given
