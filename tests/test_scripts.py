"""Helpers of the diagnostic scripts in scripts/ (their numbers are quoted in docs/)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_budget_finds_the_missing_constant_term():
    budget = _load("error_budget")
    rng = np.random.default_rng(3)
    formal = rng.uniform(5, 20, 200_000)
    error = np.hypot(formal, 15.0) * rng.standard_normal(formal.size)
    assert abs(budget.constant_for_unit_pull(error, formal**2) - 15.0) < 0.3
    # errors already covered (pull width <= 1): no term is needed
    assert budget.constant_for_unit_pull(formal * rng.standard_normal(formal.size) * 0.9, formal**2) == 0.0
