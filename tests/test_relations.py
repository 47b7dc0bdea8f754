"""Tests of the Mann et al. (2015) Teff-R / Teff-M relations and L = R^2 (T/5772)^4."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lamost_mdwarf import relations
from lamost_mdwarf.relations import (
    MASS_COEFFS,
    RADIUS_COEFFS,
    fit_mann15_relations,
    log_surface_gravity,
    luminosity_from_radius_teff,
    mass_from_teff,
    radius_from_teff,
)

MANN15_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real" / "catalogs" / "mann15.stars.csv"


@pytest.fixture(scope="module")
def mann15_path() -> Path:
    if not MANN15_CSV.is_file():
        pytest.skip(f"Mann et al. (2015) table not found at {MANN15_CSV} (../shared is absent)")
    return MANN15_CSV


def _mann15_columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return tuple(np.array([float(r[key]) for r in rows]) for key in ("Teff", "R", "M"))


def test_shipped_coefficients_match_a_refit(mann15_path: Path) -> None:
    fit = fit_mann15_relations(mann15_path)
    assert fit.n_stars == 183
    np.testing.assert_allclose(fit.radius_coeffs, RADIUS_COEFFS, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.mass_coeffs, MASS_COEFFS, rtol=1e-9, atol=1e-12)
    assert fit.teff_range_k == relations.TEFF_CALIBRATED_RANGE_K
    # the calibration sample scatters by ~0.05 Rsun / Msun about the relations
    assert 0.03 < fit.radius_rms_rsun < 0.07
    assert 0.03 < fit.mass_rms_msun < 0.07


def test_relations_follow_the_mann15_stars(mann15_path: Path) -> None:
    teff, radius, mass = _mann15_columns(mann15_path)
    # binned medians of the calibration stars lie close to the relations
    for lo in range(2900, 4100, 200):
        inside = (teff >= lo) & (teff < lo + 200)
        centre = np.median(teff[inside])
        assert abs(np.median(radius[inside]) - radius_from_teff(centre)) < 0.05
        assert abs(np.median(mass[inside]) - mass_from_teff(centre)) < 0.06
    # and the residuals are unbiased
    assert abs(np.mean(radius - radius_from_teff(teff))) < 0.01
    assert abs(np.mean(mass - mass_from_teff(teff))) < 0.01


def test_relations_are_positive_and_increasing_over_the_m_dwarf_range() -> None:
    teff = np.linspace(2500.0, 4400.0, 400)
    radius, mass = radius_from_teff(teff), mass_from_teff(teff)
    assert np.all(radius > 0) and np.all(mass > 0)
    assert np.all(np.diff(radius) > 0) and np.all(np.diff(mass) > 0)
    # early M (3850 K) vs mid M (3300 K): textbook radii and masses
    assert 0.5 < radius_from_teff(3850.0) < 0.65 and 0.2 < radius_from_teff(3300.0) < 0.35
    assert 0.5 < mass_from_teff(3850.0) < 0.68 and 0.18 < mass_from_teff(3300.0) < 0.35


def test_scalar_in_scalar_out_and_nan_propagates() -> None:
    assert isinstance(radius_from_teff(3500.0), float)
    assert isinstance(mass_from_teff(3500), float)
    out = radius_from_teff(np.array([3500.0, np.nan]))
    assert np.isfinite(out[0]) and np.isnan(out[1])


def test_luminosity() -> None:
    assert luminosity_from_radius_teff(1.0, 5772.0) == pytest.approx(1.0)
    assert luminosity_from_radius_teff(0.5, 2886.0) == pytest.approx(0.25 / 16.0)
    radius = np.array([0.2, 0.4])
    teff = np.array([3200.0, 3700.0])
    np.testing.assert_allclose(luminosity_from_radius_teff(radius, teff), radius**2 * (teff / 5772.0) ** 4)


def test_surface_gravity_of_the_sun() -> None:
    assert log_surface_gravity(1.0, 1.0) == pytest.approx(4.438, abs=1e-3)
    assert log_surface_gravity(0.3, 0.3) == pytest.approx(4.438 - np.log10(0.3), abs=1e-3)


@pytest.mark.parametrize("bad", [0.0, -3000.0, np.inf])
def test_bad_temperatures_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        radius_from_teff(np.array([3500.0, bad]))
    with pytest.raises(ValueError):
        mass_from_teff(bad)
    with pytest.raises(ValueError):
        luminosity_from_radius_teff(0.3, bad)


def test_negative_radius_raises() -> None:
    with pytest.raises(ValueError, match="radii"):
        luminosity_from_radius_teff(-0.1, 3500.0)


def test_inputs_are_not_modified() -> None:
    teff = np.array([3000.0, 3500.0, 4000.0])
    before = teff.copy()
    radius_from_teff(teff)
    mass_from_teff(teff)
    luminosity_from_radius_teff(np.array([0.2, 0.3, 0.5]), teff)
    np.testing.assert_array_equal(teff, before)


def test_refit_rejects_bad_tables(tmp_path: Path) -> None:
    missing = tmp_path / "missing_column.csv"
    missing.write_text("Teff,R\n3500,0.3\n")
    with pytest.raises(ValueError, match="missing column"):
        fit_mann15_relations(missing)
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("Teff,R,M\n3500,0.3,0.3\n3600,0.35,0.36\n,,\n")
    with pytest.raises(ValueError, match="usable rows"):
        fit_mann15_relations(tiny)
    with pytest.raises(ValueError, match="degree"):
        fit_mann15_relations(tiny, degree=0)


def test_refit_recovers_known_coefficients(tmp_path: Path) -> None:
    teff = np.linspace(2800.0, 4100.0, 30)
    path = tmp_path / "synthetic.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Teff", "R", "M"])
        writer.writerows(zip(teff, radius_from_teff(teff), mass_from_teff(teff)))
    fit = fit_mann15_relations(path)
    np.testing.assert_allclose(fit.radius_coeffs, RADIUS_COEFFS, rtol=1e-6)
    np.testing.assert_allclose(fit.mass_coeffs, MASS_COEFFS, rtol=1e-6)
    assert fit.radius_rms_rsun < 1e-10
