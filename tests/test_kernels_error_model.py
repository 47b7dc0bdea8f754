"""The SNR error model: the paper's Table 2 (corrected), binning, fitting, floors, combination."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_mdwarf.kernels.error_model import (
    PAPER_ERROR_MODEL,
    QuadraticErrorModel,
    binned_residual_scatter,
    combine_errors,
    error_model_sigma,
    fit_error_model,
)


def test_paper_table2_with_corrected_coefficients():
    teff = PAPER_ERROR_MODEL["teff"]
    assert round(float(error_model_sigma(teff, 100.0))) == 106
    np.testing.assert_allclose(error_model_sigma(teff, 100.0), 174.639 - 94.2 + 25.94)
    floors = {"teff": 89.2, "radius": 0.0432, "mass": 0.0516, "luminosity": 0.0097}
    for name, floor in floors.items():
        model = PAPER_ERROR_MODEL[name]
        assert model.snr_threshold == 225.0
        np.testing.assert_allclose(error_model_sigma(model, [225.5, 300.0, 1000.0]), floor)
        # Below the threshold: the quadratic, never below the floor.
        snr = np.linspace(50, 225, 200)
        sigma = error_model_sigma(model, snr)
        quadratic = model.c0 + model.c1 * snr + model.c2 * snr**2
        np.testing.assert_allclose(sigma, np.maximum(quadratic, floor))
        assert np.all(sigma >= floor)
    # The Teff quadratic dips below its floor near SNR 182 and is clipped there.
    assert teff.c0 + teff.c1 * 182 + teff.c2 * 182**2 < 89.2
    np.testing.assert_allclose(error_model_sigma(teff, 182.0), 89.2)
    # The paper's step down at the threshold.
    assert error_model_sigma(teff, 224.9) > 93.9 and error_model_sigma(teff, 225.1) == 89.2


def test_paper_floors_against_the_quadratic_minimum():
    def vertex_value(c0, c1, c2):
        return c0 - c1 * c1 / (4 * c2)

    teff = PAPER_ERROR_MODEL["teff"]
    assert abs(vertex_value(teff.c0, teff.c1, teff.c2) - teff.floor) < 0.1
    for name, half_digit in (("radius", 0.05e-6), ("mass", 0.05e-6)):
        m = PAPER_ERROR_MODEL[name]
        low = vertex_value(m.c0, m.c1, m.c2 - half_digit)
        high = vertex_value(m.c0, m.c1, m.c2 + half_digit)
        assert low <= m.floor <= high
    lum = PAPER_ERROR_MODEL["luminosity"]
    assert lum.floor < vertex_value(lum.c0, lum.c1, lum.c2 - 0.05e-7)  # documented exception


def test_nan_snr_stays_nan():
    sigma = error_model_sigma(PAPER_ERROR_MODEL["mass"], np.array([np.nan, 100.0]))
    assert np.isnan(sigma[0]) and np.isfinite(sigma[1])


def test_equal_count_bins_against_brute_force():
    rng = np.random.default_rng(0)
    n = 3 * 1360 + 860
    snr = rng.uniform(50, 400, n)
    residuals = rng.normal(size=n)
    snr_in, res_in = snr.copy(), residuals.copy()
    bins = binned_residual_scatter(residuals, snr)
    np.testing.assert_array_equal(snr, snr_in)
    np.testing.assert_array_equal(residuals, res_in)
    np.testing.assert_array_equal(bins.n_stars, [1360, 1360, 1360, 860])
    order = np.argsort(snr)
    groups = np.split(order, [1360, 2720, 4080])
    for k, group in enumerate(groups):
        np.testing.assert_allclose(bins.scatter[k], residuals[group].std(ddof=1))
        np.testing.assert_allclose(bins.snr_mean[k], snr[group].mean())
        np.testing.assert_allclose(bins.mean_residual[k], residuals[group].mean())
        assert bins.snr_low[k] == snr[group].min() and bins.snr_high[k] == snr[group].max()
    # A remainder under half a bin joins the previous bin.
    small_remainder = binned_residual_scatter(residuals[: 3 * 1360 + 500], snr[: 3 * 1360 + 500])
    np.testing.assert_array_equal(small_remainder.n_stars, [1360, 1360, 1860])
    by_count = binned_residual_scatter(residuals, snr, n_bins=8)
    assert by_count.n_stars.sum() == n and by_count.n_stars.max() - by_count.n_stars.min() <= 1
    assert np.all(np.diff(by_count.snr_mean) > 0)


def test_non_finite_residuals_are_ignored():
    rng = np.random.default_rng(1)
    residuals = rng.normal(size=100)
    snr = rng.uniform(50, 300, 100)
    residuals[:10] = np.nan
    bins = binned_residual_scatter(residuals, snr, stars_per_bin=30)
    assert bins.n_stars.sum() == 90


def test_fit_recovers_a_known_error_law():
    rng = np.random.default_rng(2)
    truth = PAPER_ERROR_MODEL["teff"]
    snr = rng.uniform(50, 320, 40_000)
    true_sigma = truth.c0 + truth.c1 * snr + truth.c2 * snr**2
    residuals = rng.normal(size=snr.size) * true_sigma
    model, bins = fit_error_model(residuals, snr, stars_per_bin=1360, unit="K")
    assert model.unit == "K" and model.snr_threshold == 225.0
    grid = np.array([60.0, 100.0, 150.0, 200.0])
    fitted = model.c0 + model.c1 * grid + model.c2 * grid**2
    expected = truth.c0 + truth.c1 * grid + truth.c2 * grid**2
    np.testing.assert_allclose(fitted, expected, rtol=0.03)
    vertex = -model.c1 / (2 * model.c2)
    np.testing.assert_allclose(model.floor, model.c0 + model.c1 * vertex + model.c2 * vertex**2)
    np.testing.assert_allclose(model.floor, 89.1, atol=2.0)
    assert bins.snr_mean.size == 40_000 // 1360

    at_threshold, _ = fit_error_model(residuals, snr, floor_method="threshold_value")
    np.testing.assert_allclose(at_threshold.floor, model.c0 + model.c1 * 225 + model.c2 * 225**2)
    empirical, _ = fit_error_model(residuals, snr, floor_method="empirical")
    np.testing.assert_allclose(empirical.floor, residuals[snr > 225].std(ddof=1))


def test_fit_rejects_bad_input():
    rng = np.random.default_rng(3)
    snr = rng.uniform(50, 300, 3000)
    residuals = rng.normal(size=3000)
    with pytest.raises(ValueError, match="3 SNR bins"):
        fit_error_model(residuals, snr, stars_per_bin=1360)
    with pytest.raises(ValueError, match="floor_method"):
        fit_error_model(residuals, snr, n_bins=5, floor_method="median")
    with pytest.raises(ValueError, match="empirical"):
        fit_error_model(residuals, snr, n_bins=5, snr_threshold=1e6, floor_method="empirical")
    # Scatter falling steeply with SNR: the fitted minimum is negative -> clear error.
    steep = rng.normal(size=3000) * np.clip(300 - snr, 1e-3, None)
    with pytest.raises(ValueError, match="floor"):
        fit_error_model(steep, snr, n_bins=10, snr_threshold=400, floor_method="threshold_value")
    with pytest.raises(ValueError):
        binned_residual_scatter(residuals, snr[:10])
    with pytest.raises(ValueError):
        binned_residual_scatter(residuals, snr, stars_per_bin=1)


def test_combine_errors_modes():
    formal = np.array([30.0, 120.0, np.nan])
    model = np.array([100.0, 100.0, 100.0])
    np.testing.assert_array_equal(combine_errors(formal, model), model)
    np.testing.assert_allclose(combine_errors(formal, model, "quadrature")[:2], np.hypot([30, 120], 100))
    assert np.isnan(combine_errors(formal, model, "quadrature")[2])
    np.testing.assert_allclose(combine_errors(formal, model, "max")[:2], [100.0, 120.0])
    with pytest.raises(ValueError):
        combine_errors(formal, model, "sum")


def test_custom_model_threshold():
    model = QuadraticErrorModel(c0=1.0, c1=0.0, c2=0.0, floor=0.5, snr_threshold=100.0)
    np.testing.assert_allclose(error_model_sigma(model, [50, 100, 101]), [1.0, 1.0, 0.5])
